//! A PostgreSQL cluster of a test's own, for tests that reconfigure, stop or
//! restart the server (the shared one is never touched): initdb into a folder of
//! its own, pg_ctl to start and stop it. initdb refuses to run as root, so as
//! root every server command runs as the `postgres` user.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::helpers::free_port;

pub struct OwnPostgres {
    bin: PathBuf,
    as_root: bool,
    pub port: u16,
    pub dir: PathBuf,
}

impl OwnPostgres {
    /// An initialised cluster, not started. `prepare` may put files in its
    /// folder first (certificates …). None only when the machine has no
    /// PostgreSQL server binaries; any other failure fails the test.
    pub fn init(prepare: impl FnOnce(&Path)) -> Option<OwnPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|b| b.join("initdb").exists() && b.join("pg_ctl").exists())?;
        let as_root = Command::new("id")
            .arg("-u")
            .output()
            .is_ok_and(|o| o.stdout.starts_with(b"0\n"));
        let dir = std::env::temp_dir().join(format!("us-pg-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        prepare(&dir);
        let pg = OwnPostgres {
            bin,
            as_root,
            port: free_port(),
            dir,
        };
        if as_root {
            pg.must(
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&pg.dir),
            );
        }
        pg.must(pg.tool("initdb").arg("-D").arg(pg.data()).args([
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ]));
        Some(pg)
    }

    pub fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Starts the server on 127.0.0.1:port, with `extra` server options.
    pub fn start(&self, extra: &str) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} {extra}",
            self.port,
            self.dir.display(),
        );
        self.must(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "30", "-o", &options, "start"]),
        );
    }

    /// A fast shutdown: open connections are terminated (SQLSTATE 57P01).
    pub fn stop(&self) {
        self.must(
            self.tool("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-m", "fast", "stop"]),
        );
    }

    pub fn tool(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        if self.as_root {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(program);
            c
        } else {
            Command::new(program)
        }
    }

    pub fn must(&self, command: &mut Command) {
        let out = command.output().unwrap();
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        assert!(
            out.status.success(),
            "{command:?}: {}{}\n{log}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    pub fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self
            .tool("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
