//! Input that used to reach a 500: NUL bytes in list filters, forged or truncated
//! page cursors, dates PostgreSQL cannot hold, and emails carrying invisible or
//! text-direction characters. Each answers 400 `validation_failed` naming the field.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use serde_json::{json, Value};

use crate::helpers::{get_bearer, TestApp, STRONG_PASSWORD};

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

/// Percent-encodes a query value (NUL, `+`, `:` and all).
fn q(v: &str) -> String {
    v.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// The `field` of a 400 `validation_failed` answer, or what came instead.
async fn refused_field(res: reqwest::Response) -> Result<String, String> {
    let status = res.status().as_u16();
    let body: Value = res.json().await.unwrap_or(Value::Null);
    if status == 400 && body["code"] == "validation_failed" {
        let fields: Vec<&str> = body["errors"]
            .as_array()
            .map(|e| e.iter().filter_map(|e| e["field"].as_str()).collect())
            .unwrap_or_default();
        Ok(fields.join(","))
    } else {
        Err(format!("{status} {body}"))
    }
}

/// A page with a next cursor from `path` (the list must hold two items or more).
async fn real_cursor(app: &TestApp, path: &str, token: &str) -> String {
    let sep = if path.contains('?') { '&' } else { '?' };
    let res = get_bearer(app, &format!("{path}{sep}limit=1"), token).await;
    assert_eq!(res.status(), 200, "{path}");
    let body: Value = res.json().await.unwrap();
    body["next_cursor"]
        .as_str()
        .unwrap_or_else(|| panic!("{path} has a second page: {body}"))
        .to_string()
}

#[tokio::test]
async fn hostile_filters_cursors_and_dates_on_every_list_answer_400_naming_the_field() {
    let app = TestApp::spawn().await;
    let (admin_id, _, token) = app.user_with_token().await;
    app.make_admin(admin_id).await;
    app.user_with_token().await;

    // Two of everything, so every list has a real cursor to truncate.
    let mut account = String::new();
    let mut key = String::new();
    for i in 0..2 {
        let res = app
            .http
            .post(app.url("/v1/trading-accounts"))
            .bearer_auth(&token)
            .json(&json!({"broker": "zerodha", "broker_user_id": format!("ZX{i}"), "nickname": format!("n{i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        account = res.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
        let res = app
            .http
            .post(app.url("/v1/api-keys"))
            .bearer_auth(&token)
            .json(&json!({"name": format!("k{i}"), "scopes": ["accounts:read"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 201);
        let body: Value = res.json().await.unwrap();
        key = body["id"].as_str().unwrap().to_string();
        // Two usage rows for this key (one per operation).
        for path in ["/v1/users/me", "/v1/trading-accounts"] {
            let r = app
                .http
                .get(app.url(path))
                .header("x-api-key", body["key"].as_str().unwrap())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    // Membership takes the invitee's consent: invite, then accept as the invitee.
    for who in ["viewer", "trader"] {
        let (_, member, member_token) = app.user_with_token().await;
        crate::accounts::add_member(
            &app,
            &token,
            account.parse().unwrap(),
            &member,
            who,
            &member_token,
        )
        .await;
    }
    // Usage is written in the background: wait for both rows.
    for _ in 0..100 {
        let n: i64 = sqlx::query_scalar("select count(*) from api_key_usage_logs")
            .fetch_one(&app.db)
            .await
            .unwrap_or(0);
        if n >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    let lists = [
        "/v1/admin/users".to_string(),
        "/v1/admin/audit-logs".to_string(),
        "/v1/trading-accounts".to_string(),
        "/v1/users/me/accounts".to_string(),
        format!("/v1/trading-accounts/{account}/members"),
        "/v1/api-keys".to_string(),
        format!("/v1/api-keys/{key}/usage"),
    ];
    let mut cases: Vec<(String, &str)> = Vec::new();
    let mut wrong = Vec::new();
    for list in &lists {
        let real = real_cursor(&app, list, &token).await;
        // A truncated cursor is refused, unless what is left still names a
        // position (an audit row id "141" cut to "14"): then it is a page.
        let truncated = &real[..real.len() / 2];
        let res = get_bearer(&app, &format!("{list}?cursor={}", q(truncated)), &token).await;
        if res.status() != 200 {
            match refused_field(res).await {
                Ok(f) if f == "cursor" => {}
                other => wrong.push(format!("{list} truncated cursor: {other:?}")),
            }
        }
        let forged = [
            format!("{real}!"),
            "\0".to_string(),
            b64("\0"),
            b64(&format!("{}.1", -200_000_000_000_000_000_i64)),
            b64(&format!("{}.{}", i64::MAX, uuid::Uuid::nil())),
            b64("99999999999999999999999"),
            b64(&format!("-262000-01-01T00:00:00Z|{}", uuid::Uuid::nil())),
            b64(&format!("0000-01-01T00:00:00Z|{}", uuid::Uuid::nil())),
            "not base64!".to_string(),
        ];
        for c in forged {
            cases.push((format!("{list}?cursor={}", q(&c)), "cursor"));
        }
    }
    for (param, value) in [("email", "a\0b"), ("status", "active\0")] {
        cases.push((format!("/v1/admin/users?{param}={}", q(value)), param));
    }
    for (param, value) in [
        ("action", "auth.login\0"),
        ("actor_id", "\0"),
        ("target_id", "x\0y"),
        ("since", "+10000-01-01T00:00:00Z"),
        ("until", "-10000-01-01T00:00:00Z"),
        ("since", "+262142-12-31T00:00:00Z"),
        ("until", "-262143-01-01T00:00:00Z"),
        ("since", "0000-01-01T00:00:00Z"),
    ] {
        cases.push((format!("/v1/admin/audit-logs?{param}={}", q(value)), param));
    }

    for (path, field) in &cases {
        let res = get_bearer(&app, path, &token).await;
        match refused_field(res).await {
            Ok(f) if f == *field => {}
            Ok(f) => wrong.push(format!("{path}: 400 naming {f:?}, not {field:?}")),
            Err(other) => wrong.push(format!("{path}: {other}")),
        }
    }

    // Dates in bodies: an API key's expiry, an account's subscription end.
    for expires in [
        "+10000-01-01T00:00:00Z",
        "-10000-01-01T00:00:00Z",
        "0000-06-01T00:00:00Z",
    ] {
        let res = app
            .http
            .post(app.url("/v1/api-keys"))
            .bearer_auth(&token)
            .json(&json!({"name": "late", "scopes": ["accounts:read"], "expires_at": expires}))
            .send()
            .await
            .unwrap();
        match refused_field(res).await {
            Ok(f) if f == "expires_at" => {}
            other => wrong.push(format!("POST /v1/api-keys expires_at={expires}: {other:?}")),
        }
        let res = app
            .http
            .patch(app.url(&format!("/v1/trading-accounts/{account}")))
            .bearer_auth(&token)
            .json(&json!({"subscription_expires_at": expires}))
            .send()
            .await
            .unwrap();
        match refused_field(res).await {
            Ok(f) if f == "subscription_expires_at" => {}
            other => wrong.push(format!(
                "PATCH account subscription_expires_at={expires}: {other:?}"
            )),
        }
    }
    // Adding a member by an email carrying NUL or an invisible character.
    for email in ["a\0b@example.com", "bo\u{200B}b@example.com"] {
        let res = app
            .http
            .post(app.url(&format!("/v1/trading-accounts/{account}/members")))
            .bearer_auth(&token)
            .json(&json!({"email": email, "role": "viewer"}))
            .send()
            .await
            .unwrap();
        match refused_field(res).await {
            Ok(f) if f == "email" => {}
            other => wrong.push(format!("member add email={email:?}: {other:?}")),
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {}:\n{}",
        wrong.len(),
        cases.len() + 6 + lists.len(),
        wrong.join("\n")
    );

    // The lists still work with their real cursors.
    for list in &lists {
        let c = real_cursor(&app, list, &token).await;
        let sep = if list.contains('?') { '&' } else { '?' };
        let res = get_bearer(
            &app,
            &format!("{list}{sep}limit=1&cursor={}", q(&c)),
            &token,
        )
        .await;
        assert_eq!(res.status(), 200, "{list}");
    }
}

const INVISIBLE: [(char, &str); 8] = [
    ('\u{200B}', "zero-width space"),
    ('\u{200D}', "zero-width joiner"),
    ('\u{00AD}', "soft hyphen"),
    ('\u{FEFF}', "byte-order mark"),
    ('\u{202E}', "right-to-left override"),
    ('\u{2066}', "left-to-right isolate"),
    ('\u{200F}', "right-to-left mark"),
    ('\u{E0041}', "tag letter"),
];

#[tokio::test]
async fn emails_with_invisible_or_direction_characters_are_refused_at_registration() {
    let app = TestApp::spawn().await;
    for (c, name) in INVISIBLE {
        for email in [
            format!("ali{c}ce@example.com"),
            format!("alice@exam{c}ple.com"),
        ] {
            let res = app
                .post_json(
                    "/v1/auth/register",
                    &json!({"email": email, "password": STRONG_PASSWORD, "full_name": "Alice"}),
                )
                .await;
            assert_eq!(refused_field(res).await, Ok("email".into()), "{name}");
        }
    }
    let n: i64 = sqlx::query_scalar("select count(*) from users")
        .fetch_one(&app.db)
        .await
        .unwrap();
    assert_eq!(n, 0, "nothing was registered");
    // The plain address still registers.
    let res = app
        .post_json(
            "/v1/auth/register",
            &json!({"email": "alice@example.com", "password": STRONG_PASSWORD, "full_name": "Alice"}),
        )
        .await;
    assert_eq!(res.status(), 201);
}
