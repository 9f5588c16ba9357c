//! The systemd units: parsed as systemd reads them, hardened, their syscall filter,
//! and the hashing threads' low priority (with the metric and warning around it).

use std::collections::BTreeSet;

use crate::helpers::test_vars;

use super::{
    deploy_files, env_file_names, parse_unit, referenced_variables, rel, unit_environment_names,
};

#[test]
fn systemd_units_parse_and_are_hardened() {
    let units = deploy_files(&[".service"]);
    let envs: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().to_string())
        .collect();
    for e in [
        "user-service-dev.service",
        "user-service-staging.service",
        "user-service-production.service",
    ] {
        assert!(envs.iter().any(|n| n == e), "missing deploy/systemd/{e}");
    }
    for unit in &units {
        let entries = parse_unit(unit);
        let get = |section: &str, key: &str| {
            entries
                .iter()
                .find(|(s, k, _)| s == section && k == key)
                .map(|(_, _, v)| v.as_str())
        };
        for section in ["Unit", "Service", "Install"] {
            assert!(
                entries.iter().any(|(s, _, _)| s == section),
                "{}: no [{section}]",
                rel(unit)
            );
        }
        for (key, want) in [
            ("NoNewPrivileges", Some("yes")),
            ("ProtectSystem", Some("strict")),
            ("PrivateTmp", Some("yes")),
            ("ProtectHome", Some("yes")),
            ("CapabilityBoundingSet", Some("")),
            ("Restart", Some("on-failure")),
        ] {
            assert_eq!(get("Service", key), want, "{}: {key}", rel(unit));
        }
        for key in ["User", "WorkingDirectory", "EnvironmentFile", "ExecStart"] {
            assert!(
                get("Service", key).is_some_and(|v| !v.is_empty()),
                "{}: {key}",
                rel(unit)
            );
        }
        let name = unit.file_name().unwrap().to_string_lossy().to_string();
        let env = name
            .trim_start_matches("user-service-")
            .trim_end_matches(".service");
        let environment = get("Service", "Environment").unwrap_or_default();
        assert!(
            environment.contains(&format!(
                "ENV_FILE=/opt/stocksblitz/user-service/.env.{env}"
            )),
            "{}: ENV_FILE must point at .env.{env}",
            rel(unit)
        );
    }
}

#[test]
fn unit_and_env_file_parsers_read_what_systemd_reads() {
    assert_eq!(
        unit_environment_names(r#"APP_ENV=staging "ENV_FILE=/a b/.env" X="y z""#),
        ["APP_ENV", "ENV_FILE", "X"]
    );
    let text = "A=1\n# c\nB=\"line one\nline two\"\nC=\n";
    assert_eq!(env_file_names(text), ["A", "B", "C"]);
    assert_eq!(referenced_variables("x=${A}-${B_2}"), ["A", "B_2"]);
}

// --- systemd: the syscall filter lets the hashing threads lower their priority ----

/// Whether a unit's `SystemCallFilter=` lines, in order, allow `call`, as
/// systemd.exec(5) reads them: the first line decides the kind of list (allow, or
/// `~` deny), later lines add to or take from it, an empty one resets. `contains`
/// says whether a name (`@group` or call) covers `call`.
fn syscall_allowed(filters: &[String], call: &str, contains: &dyn Fn(&str) -> bool) -> bool {
    let mut allowed: Option<bool> = None;
    for f in filters {
        if f.is_empty() {
            allowed = None;
            continue;
        }
        let (deny, list) = match f.strip_prefix('~') {
            Some(rest) => (true, rest),
            None => (false, f.as_str()),
        };
        let named = list.split_whitespace().any(|t| t == call || contains(t));
        allowed = Some(match allowed {
            None => named != deny,
            Some(_) if named => !deny,
            Some(before) => before,
        });
    }
    allowed.unwrap_or(true)
}

/// The syscall groups (recursively) that include sched_setscheduler: systemd 252's
/// sets, confirmed with `systemd-analyze syscall-filter` where it is installed.
fn groups_with_sched_setscheduler(group: &str) -> bool {
    const STATIC: [&str; 3] = ["@resources", "@system-service", "@known"];
    let analyze = |g: &str| -> Option<Vec<String>> {
        let out = std::process::Command::new("systemd-analyze")
            .args(["syscall-filter", g])
            .output()
            .ok()?;
        out.status.success().then(|| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .skip(1)
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(str::to_string)
                .collect()
        })
    };
    fn expand(
        g: &str,
        analyze: &dyn Fn(&str) -> Option<Vec<String>>,
        seen: &mut BTreeSet<String>,
    ) -> Option<bool> {
        if !seen.insert(g.to_string()) {
            return Some(false);
        }
        let members = analyze(g)?;
        for m in members {
            if m == "sched_setscheduler" || (m.starts_with('@') && expand(&m, analyze, seen)?) {
                return Some(true);
            }
        }
        Some(false)
    }
    if !group.starts_with('@') {
        return false;
    }
    match expand(group, &analyze, &mut BTreeSet::new()) {
        Some(found) => {
            assert_eq!(
                found,
                STATIC.contains(&group),
                "systemd-analyze disagrees about {group}"
            );
            found
        }
        None => STATIC.contains(&group),
    }
}

#[test]
fn the_syscall_filter_reading_matches_systemd() {
    let lines = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let f = &groups_with_sched_setscheduler;
    // The units as shipped before: ~@resources denied it.
    assert!(!syscall_allowed(
        &lines(&["@system-service", "~@privileged @resources"]),
        "sched_setscheduler",
        f
    ));
    assert!(syscall_allowed(
        &lines(&[
            "@system-service",
            "~@privileged @resources",
            "sched_setscheduler"
        ]),
        "sched_setscheduler",
        f
    ));
    assert!(!syscall_allowed(
        &lines(&["@basic-io"]),
        "sched_setscheduler",
        f
    ));
    assert!(syscall_allowed(
        &lines(&["~@privileged"]),
        "sched_setscheduler",
        f
    ));
    assert!(syscall_allowed(&[], "sched_setscheduler", f));
}

/// The hashing threads move themselves to SCHED_IDLE (src/crypto/password.rs); a
/// unit whose filter denies sched_setscheduler silently loses that.
#[test]
fn systemd_units_let_the_hashing_threads_lower_their_priority() {
    let units = deploy_files(&[".service"]);
    assert!(units.len() >= 3);
    for unit in &units {
        let entries = parse_unit(unit);
        let filters: Vec<String> = entries
            .iter()
            .filter(|(s, k, _)| s == "Service" && k == "SystemCallFilter")
            .map(|(_, _, v)| v.clone())
            .collect();
        assert!(!filters.is_empty(), "{}: no SystemCallFilter", rel(unit));
        assert!(
            syscall_allowed(
                &filters,
                "sched_setscheduler",
                &groups_with_sched_setscheduler
            ),
            "{}: SystemCallFilter denies sched_setscheduler ({filters:?})",
            rel(unit)
        );
        // The rest of the sandbox stays: privileged calls denied, no real-time.
        let get = |key: &str| {
            entries
                .iter()
                .find(|(s, k, _)| s == "Service" && k == key)
                .map(|(_, _, v)| v.as_str())
        };
        assert_eq!(get("RestrictRealtime"), Some("yes"), "{}", rel(unit));
        assert!(
            filters
                .iter()
                .any(|f| f.starts_with('~') && f.contains("@privileged")),
            "{}",
            rel(unit)
        );
    }
}

/// Where systemd-analyze is installed: `verify` finds nothing but the binary that
/// is not installed here, and the offline security rating stays "OK" (below 2).
#[test]
fn systemd_analyze_accepts_the_units_when_it_is_installed() {
    if std::process::Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no systemd-analyze");
        return;
    }
    let dir = std::env::temp_dir().join(format!("us-units-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    for unit in deploy_files(&[".service"]) {
        let copy = dir.join(unit.file_name().unwrap());
        std::fs::copy(&unit, &copy).unwrap();
        let verify = std::process::Command::new("systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let complaints: Vec<String> = String::from_utf8_lossy(&verify.stderr)
            .lines()
            .filter(|l| !l.contains("is not executable"))
            .map(str::to_string)
            .collect();
        assert!(complaints.is_empty(), "{}: {complaints:?}", rel(&unit));
        let security = std::process::Command::new("systemd-analyze")
            .args(["security", "--offline=true"])
            .arg(&copy)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&security.stdout);
        let level: f64 = out
            .lines()
            .find_map(|l| l.split("Overall exposure level for ").nth(1))
            .and_then(|rest| rest.split(": ").nth(1))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{}: no rating in {out}", rel(&unit)));
        assert!(level < 2.0, "{}: exposure {level}", rel(&unit));
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn metrics_report_whether_hashing_runs_at_low_priority() {
    let app = crate::helpers::TestApp::spawn().await;
    let body = app.get("/metrics").await.text().await.unwrap();
    // The test process is not sandboxed: SCHED_IDLE takes, and says so.
    assert!(
        body.lines().any(|l| l == "password_hashing_low_priority 1"),
        "{body}"
    );
}

/// Installs, in the calling process (a child before exec), a seccomp filter that
/// fails sched_setscheduler with EPERM, as systemd's `~@resources` did.
///
/// # Safety
/// Only async-signal-safe calls (prctl) on stack data: fit for `pre_exec`.
unsafe fn deny_sched_setscheduler() -> std::io::Result<()> {
    let stmt = |code: u32, jt: u8, jf: u8, k: u32| libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    };
    let filter = [
        // seccomp_data.nr, at offset 0; the call → EPERM, the rest → allowed.
        stmt(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, 0),
        stmt(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            libc::SYS_sched_setscheduler as u32,
        ),
        stmt(
            libc::BPF_RET | libc::BPF_K,
            0,
            0,
            libc::SECCOMP_RET_ERRNO | libc::EPERM as u32,
        ),
        stmt(libc::BPF_RET | libc::BPF_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ];
    let prog = libc::sock_fprog {
        len: filter.len() as u16,
        filter: filter.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl reads `prog` and the filter, both alive for the calls.
    unsafe {
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0
            || libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &prog as *const libc::sock_fprog,
            ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The binary in a sandbox that refuses SCHED_IDLE (the shipped units' old filter):
/// it starts, warns once, and /metrics says 0.
#[tokio::test]
async fn a_sandbox_refusing_sched_idle_gets_a_warning_and_a_metric() {
    use std::os::unix::process::CommandExt as _;
    let port = crate::helpers::free_port();
    let mut vars = test_vars(&crate::helpers::fresh_database().await);
    vars.insert("USER_SERVICE_PORT".into(), port.to_string());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
    cmd.arg("serve")
        .current_dir(std::env::temp_dir())
        .env_clear()
        .envs(vars)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    // SAFETY: the closure only calls prctl (async-signal-safe) on its own stack.
    unsafe {
        cmd.pre_exec(|| deny_sched_setscheduler());
    }
    let mut child = cmd.spawn().unwrap();
    let up = crate::helpers::wait_for_port(port).await;
    let metrics = if up {
        reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    } else {
        String::new()
    };
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(up, "did not start under the filter:\n{log}");
    assert!(
        metrics
            .lines()
            .any(|l| l == "password_hashing_low_priority 0"),
        "{metrics}"
    );
    assert!(
        log.contains("password-hashing threads run at normal priority (SCHED_IDLE refused)"),
        "no start-up warning:\n{log}"
    );
    assert_eq!(
        log.matches("SCHED_IDLE refused").count(),
        1,
        "one warning, not one per thread:\n{log}"
    );
}
