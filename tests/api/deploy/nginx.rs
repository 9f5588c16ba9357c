//! The Nginx sites: JSON and gRPC to the local port, reflection and the version
//! hidden, modern ciphers, unknown host names dropped, and `nginx -t` when installed.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::repo;

#[test]
fn nginx_sites_proxy_json_and_grpc_to_the_local_port() {
    for (env, port) in [("staging", 8111), ("production", 8211)] {
        let path = repo().join(format!("deploy/nginx/user-service-{env}.conf"));
        let text = std::fs::read_to_string(&path).unwrap();
        let code: String = text
            .lines()
            .map(|l| l.split('#').next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            code.matches('{').count(),
            code.matches('}').count(),
            "{env}: unbalanced braces"
        );
        for needle in [
            format!("server 127.0.0.1:{port};"),
            "grpc_pass grpc://".into(),
            "proxy_pass http://".into(),
            "location /stocksblitz.user.v1.".into(),
            "location /grpc.".into(),
            "ssl_certificate ".into(),
            "Strict-Transport-Security".into(),
            "X-Content-Type-Options".into(),
            "frame-ancestors".into(),
            "X-Forwarded-For".into(),
        ] {
            assert!(code.contains(&needle), "{env}: missing {needle:?}");
        }
        // One kept-alive pool for both would hand HTTP/1.1 connections to gRPC (502s).
        let target = |directive: &str| -> BTreeSet<String> {
            code.lines()
                .filter_map(|l| l.trim().strip_prefix(directive))
                .map(|t| t.trim_end_matches(';').to_string())
                .collect()
        };
        let grpc = target("grpc_pass grpc://");
        let http = target("proxy_pass http://");
        assert!(
            grpc.is_disjoint(&http),
            "{env}: grpc_pass and proxy_pass share an upstream"
        );
    }
}

// --- nginx ------------------------------------------------------------------------

/// One nginx directive: its words and, for a block, the directives inside.
#[derive(Debug, Clone)]
struct Directive {
    words: Vec<String>,
    block: Option<Vec<Directive>>,
}

impl Directive {
    fn name(&self) -> &str {
        &self.words[0]
    }
    fn args(&self) -> String {
        self.words[1..].join(" ")
    }
    fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or(&[])
    }
    fn all(&self, name: &str) -> Vec<&Directive> {
        self.children()
            .iter()
            .filter(|d| d.name() == name)
            .collect()
    }
    fn value(&self, name: &str) -> Option<String> {
        self.all(name).first().map(|d| d.args())
    }
}

/// nginx's configuration syntax: words, "quoted strings", `#` comments, `;` ends a
/// directive, `{ … }` a block.
fn parse_nginx(text: &str) -> Vec<Directive> {
    let mut tokens: Vec<String> = Vec::new();
    let mut chars = text.chars().peekable();
    let mut word = String::new();
    let flush = |word: &mut String, tokens: &mut Vec<String>| {
        if !word.is_empty() {
            tokens.push(std::mem::take(word));
        }
    };
    while let Some(c) = chars.next() {
        match c {
            '#' => {
                flush(&mut word, &mut tokens);
                for c in chars.by_ref() {
                    if c == '\n' {
                        break;
                    }
                }
            }
            '"' | '\'' => {
                for q in chars.by_ref() {
                    if q == c {
                        break;
                    }
                    word.push(q);
                }
            }
            ';' | '{' | '}' => {
                flush(&mut word, &mut tokens);
                tokens.push(c.to_string());
            }
            c if c.is_whitespace() => flush(&mut word, &mut tokens),
            c => word.push(c),
        }
    }
    flush(&mut word, &mut tokens);
    fn block(tokens: &[String], i: &mut usize) -> Vec<Directive> {
        let mut out = Vec::new();
        let mut words = Vec::new();
        while *i < tokens.len() {
            let t = &tokens[*i];
            *i += 1;
            match t.as_str() {
                ";" => out.push(Directive {
                    words: std::mem::take(&mut words),
                    block: None,
                }),
                "{" => {
                    let inner = block(tokens, i);
                    out.push(Directive {
                        words: std::mem::take(&mut words),
                        block: Some(inner),
                    });
                }
                "}" => return out,
                _ => words.push(t.clone()),
            }
        }
        assert!(words.is_empty(), "unterminated directive {words:?}");
        out
    }
    block(&tokens, &mut 0)
}

fn nginx_conf(name: &str) -> Vec<Directive> {
    parse_nginx(&std::fs::read_to_string(repo().join("deploy/nginx").join(name)).unwrap())
}

fn is_tls(server: &Directive) -> bool {
    server
        .all("listen")
        .iter()
        .any(|l| l.words.iter().any(|w| w == "ssl"))
}

/// Mozilla "intermediate" for TLS 1.2: forward-secret ECDHE with AEAD ciphers.
const MOZILLA_INTERMEDIATE_ECDHE: [&str; 6] = [
    "ECDHE-ECDSA-AES128-GCM-SHA256",
    "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384",
    "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305",
    "ECDHE-RSA-CHACHA20-POLY1305",
];

#[test]
fn nginx_sites_hide_reflection_and_the_version_and_use_modern_ciphers() {
    for env in ["staging", "production"] {
        let conf = nginx_conf(&format!("user-service-{env}.conf"));
        let servers: Vec<&Directive> = conf.iter().filter(|d| d.name() == "server").collect();
        assert!(
            servers.len() >= 2,
            "{env}: expected an :80 and a :443 server"
        );
        for server in &servers {
            assert_eq!(
                server.value("server_tokens").as_deref(),
                Some("off"),
                "{env}: server_tokens on {server:?}"
            );
            // The catch-all lives in default-server.conf, once per host.
            for l in server.all("listen") {
                assert!(!l.args().contains("default_server"), "{env}: {l:?}");
            }
        }
        let tls = servers.iter().find(|s| is_tls(s)).expect("a TLS server");
        let ciphers = tls.value("ssl_ciphers").expect("ssl_ciphers set");
        for c in ciphers.split(':') {
            assert!(
                MOZILLA_INTERMEDIATE_ECDHE.contains(&c),
                "{env}: cipher {c} is not in Mozilla's intermediate ECDHE list"
            );
        }
        assert_eq!(
            tls.value("ssl_protocols").as_deref(),
            Some("TLSv1.2 TLSv1.3")
        );

        let locations = tls.all("location");
        let at = |path: &str| locations.iter().find(|l| l.args() == path).copied();
        // No catch-all /grpc. prefix that would pass reflection through.
        assert!(at("/grpc.").is_none(), "{env}: /grpc. proxies reflection");
        assert!(at("/grpc.health.v1.Health/").is_some(), "{env}: health");
        let reflection = at("/grpc.reflection.").expect("a /grpc.reflection. location");
        let rules: Vec<(String, String)> = reflection
            .children()
            .iter()
            .filter(|d| d.name() == "allow" || d.name() == "deny")
            .map(|d| (d.name().to_string(), d.args()))
            .collect();
        assert_eq!(
            rules.last(),
            Some(&("deny".to_string(), "all".to_string())),
            "{env}: reflection must end with deny all: {rules:?}"
        );
        for (kind, net) in &rules[..rules.len() - 1] {
            assert_eq!(kind, "allow", "{env}: {rules:?}");
            let net: ipnet::IpNet = net
                .parse()
                .or_else(|_| net.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .unwrap_or_else(|_| panic!("{env}: allow {net}"));
            let internal = match net.addr() {
                std::net::IpAddr::V4(a) => a.is_private() || a.is_loopback(),
                std::net::IpAddr::V6(a) => a.is_loopback() || (a.segments()[0] & 0xfe00) == 0xfc00,
            };
            assert!(internal, "{env}: reflection open to {net}");
        }
    }
}

#[test]
fn nginx_default_server_drops_unknown_host_names() {
    let conf = nginx_conf("default-server.conf");
    let servers: Vec<&Directive> = conf.iter().filter(|d| d.name() == "server").collect();
    for port in ["80", "443"] {
        let server = servers
            .iter()
            .find(|s| {
                s.all("listen")
                    .iter()
                    .any(|l| l.words[1] == port && l.words.iter().any(|w| w == "default_server"))
            })
            .unwrap_or_else(|| panic!("no default_server on {port}"));
        assert_eq!(server.value("return").as_deref(), Some("444"), ":{port}");
        assert_eq!(server.value("server_tokens").as_deref(), Some("off"));
        if port == "443" {
            assert!(is_tls(server));
            assert_eq!(
                server.value("ssl_reject_handshake").as_deref(),
                Some("on"),
                "unknown SNI names must not even get the certificate"
            );
        }
    }
}

/// The nginx binary: `NGINX` if set, else `nginx` on PATH or in /usr/sbin.
fn nginx_binary() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NGINX") {
        return Some(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .chain([PathBuf::from("/usr/sbin")])
        .map(|d| d.join("nginx"))
        .find(|p| p.is_file())
}

#[test]
fn nginx_accepts_the_sites_when_it_is_installed() {
    let Some(nginx) = nginx_binary() else {
        eprintln!("skipped: no nginx binary (set NGINX=/path/to/nginx to run it)");
        return;
    };
    let dir = std::env::temp_dir().join(format!("us-nginx-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    // A throwaway certificate in place of the placeholders.
    let cert = rcgen::generate_simple_self_signed(vec!["users.stocksblitz.com".into()]).unwrap();
    std::fs::write(dir.join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let mut includes = String::new();
    for name in [
        "default-server.conf",
        "user-service-staging.conf",
        "user-service-production.conf",
    ] {
        let text = std::fs::read_to_string(repo().join("deploy/nginx").join(name)).unwrap();
        let text: String = text
            .lines()
            .map(|l| {
                let t = l.trim_start();
                if t.starts_with("ssl_certificate_key ") {
                    format!("ssl_certificate_key {};", dir.join("key.pem").display())
                } else if t.starts_with("ssl_certificate ") {
                    format!("ssl_certificate {};", dir.join("cert.pem").display())
                } else {
                    l.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(dir.join(name), text).unwrap();
        includes.push_str(&format!("  include {};\n", dir.join(name).display()));
    }
    let d = dir.display();
    std::fs::write(
        dir.join("nginx.conf"),
        format!(
            "pid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\nhttp {{\n  access_log off;\n  \
             client_body_temp_path {d}; proxy_temp_path {d}; fastcgi_temp_path {d};\n  \
             uwsgi_temp_path {d}; scgi_temp_path {d};\n{includes}}}\n"
        ),
    )
    .unwrap();
    let out = std::process::Command::new(&nginx)
        .arg("-t")
        .arg("-p")
        .arg(&dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(dir.join("nginx.conf"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(out.status.success(), "nginx -t failed:\n{stderr}");
    assert!(stderr.contains("test is successful"), "{stderr}");
}
