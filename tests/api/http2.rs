//! HTTP/2 connection settings seen on the wire (issue 10 point 5, issue 11
//! point 4): the bound on concurrent streams is advertised, idle connections are
//! pinged and dropped when the PING goes unanswered, and SIGTERM sends GOAWAY
//! followed by a clean close rather than a reset. Raw frames, so nothing a
//! client library does hides what the server sends.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::TestApp;

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const GOAWAY: u8 = 0x7;
const ACK: u8 = 0x1;
const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

struct Frame {
    kind: u8,
    flags: u8,
    payload: Vec<u8>,
}

async fn write_frame(conn: &mut TcpStream, kind: u8, flags: u8, payload: &[u8]) {
    let len = payload.len() as u32;
    let mut head = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    head.extend_from_slice(&0u32.to_be_bytes());
    conn.write_all(&head).await.unwrap();
    conn.write_all(payload).await.unwrap();
}

/// The next frame; Ok(None) on a clean end of stream.
async fn read_frame(conn: &mut TcpStream) -> std::io::Result<Option<Frame>> {
    let mut head = [0u8; 9];
    match conn.read_exact(&mut head).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    conn.read_exact(&mut payload).await?;
    Ok(Some(Frame {
        kind: head[3],
        flags: head[4],
        payload,
    }))
}

/// Prior-knowledge HTTP/2 (h2c): preface and empty SETTINGS; returns the
/// server's SETTINGS parameters, already acknowledged.
async fn open(app: &TestApp) -> (TcpStream, Vec<(u16, u32)>) {
    let mut conn = TcpStream::connect(("127.0.0.1", app.port)).await.unwrap();
    conn.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    write_frame(&mut conn, SETTINGS, 0, &[]).await;
    let first = tokio::time::timeout(Duration::from_secs(5), read_frame(&mut conn))
        .await
        .expect("the server's SETTINGS")
        .unwrap()
        .expect("a frame before the close");
    assert_eq!(
        first.kind, SETTINGS,
        "the server speaks first with SETTINGS"
    );
    let params = first
        .payload
        .chunks_exact(6)
        .map(|c| {
            (
                u16::from_be_bytes([c[0], c[1]]),
                u32::from_be_bytes([c[2], c[3], c[4], c[5]]),
            )
        })
        .collect();
    write_frame(&mut conn, SETTINGS, ACK, &[]).await;
    (conn, params)
}

/// What the server sends until it closes the connection or `limit` passes,
/// answering its PINGs (when `answer_pings`) and SETTINGS like a live client.
/// Err on a reset or on the time running out.
async fn frames_until_close(
    conn: &mut TcpStream,
    limit: Duration,
    answer_pings: bool,
) -> std::io::Result<Vec<(Instant, Frame)>> {
    let deadline = tokio::time::Instant::now() + limit;
    let mut seen = Vec::new();
    loop {
        let frame = match tokio::time::timeout_at(deadline, read_frame(conn)).await {
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
            Ok(r) => r?,
        };
        let Some(frame) = frame else {
            return Ok(seen);
        };
        let flags = frame.flags;
        match frame.kind {
            PING if answer_pings && flags & ACK == 0 => {
                // A server that has closed its side may reset these; the
                // frames read so far tell the story.
                let _ = conn.write_all(&ping_ack(&frame.payload)).await;
            }
            SETTINGS if flags & ACK == 0 => {
                let _ = conn.write_all(&[0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]).await;
            }
            _ => {}
        }
        seen.push((Instant::now(), frame));
    }
}

fn ping_ack(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0, 0, 8, PING, ACK, 0, 0, 0, 0];
    f.extend_from_slice(payload);
    f
}

#[tokio::test]
async fn http2_advertises_its_stream_bound_and_drops_unanswered_keepalives() {
    let app = TestApp::spawn_with(|v| {
        v.insert("HTTP2_MAX_CONCURRENT_STREAMS".into(), "7".into());
        v.insert("HTTP2_KEEPALIVE_INTERVAL_SECONDS".into(), "1".into());
        // Neither of these must be what ends the connection here.
        v.insert("HTTP_HEADER_READ_TIMEOUT_SECONDS".into(), "60".into());
        v.insert("HTTP_IDLE_TIMEOUT_SECONDS".into(), "60".into());
    })
    .await;
    let (mut conn, params) = open(&app).await;
    assert!(
        params.contains(&(SETTINGS_MAX_CONCURRENT_STREAMS, 7)),
        "SETTINGS_MAX_CONCURRENT_STREAMS=7 advertised: {params:?}"
    );

    // An idle connection is pinged about every interval; a client that answers
    // stays connected.
    let started = Instant::now();
    let mut answered = 0;
    while answered < 2 {
        let frame = tokio::time::timeout(Duration::from_secs(4), read_frame(&mut conn))
            .await
            .expect("a keepalive PING within the interval")
            .unwrap()
            .expect("the connection stays open while PINGs are answered");
        if frame.kind == PING && frame.flags & ACK == 0 {
            conn.write_all(&ping_ack(&frame.payload)).await.unwrap();
            answered += 1;
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "two PINGs took {:?} at a 1 s interval",
        started.elapsed()
    );

    // Stop answering: the connection is dropped within interval + timeout.
    let silent = Instant::now();
    let _ = frames_until_close(&mut conn, Duration::from_secs(8), false).await;
    let took = silent.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "an unanswered keepalive left the connection open {took:?}"
    );
    // The service still answers on a fresh connection.
    assert_eq!(app.get("/health").await.status(), 200);
}

#[tokio::test]
async fn sigterm_sends_http2_goaway_and_closes_cleanly() {
    let mut app = TestApp::spawn_with(|v| {
        v.insert("HTTP_HEADER_READ_TIMEOUT_SECONDS".into(), "60".into());
        v.insert("HTTP_IDLE_TIMEOUT_SECONDS".into(), "60".into());
    })
    .await;
    let (mut conn, _) = open(&app).await;
    // Anything the server sends right after the handshake (its SETTINGS ACK).
    let _ = tokio::time::timeout(Duration::from_millis(300), read_frame(&mut conn)).await;

    app.shutdown.trigger();
    let frames = frames_until_close(&mut conn, Duration::from_secs(5), true)
        .await
        .expect("a GOAWAY and a clean end of stream, not a reset or a hang");
    let goaways: Vec<&Frame> = frames
        .iter()
        .map(|(_, f)| f)
        .filter(|f| f.kind == GOAWAY)
        .collect();
    assert!(!goaways.is_empty(), "no GOAWAY before the close");
    for g in &goaways {
        assert!(g.payload.len() >= 8, "GOAWAY payload {:?}", g.payload);
        let code = u32::from_be_bytes([g.payload[4], g.payload[5], g.payload[6], g.payload[7]]);
        assert_eq!(code, 0, "GOAWAY with NO_ERROR, got error code {code}");
    }
    app.stop().await.unwrap();
}

#[test]
fn a_zero_keepalive_interval_is_refused_not_a_ping_storm() {
    // hyper would PING continuously and give each PING zero time to be
    // answered, dropping every HTTP/2 (gRPC) connection.
    let mut vars = crate::helpers::test_vars("postgres://unused@127.0.0.1/unused");
    vars.insert("HTTP2_KEEPALIVE_INTERVAL_SECONDS".into(), "0".into());
    let settings = user_service::config::Settings::from_vars(vars).unwrap();
    assert_eq!(
        settings.problems(),
        ["HTTP2_KEEPALIVE_INTERVAL_SECONDS must be at least 1"]
    );
}
