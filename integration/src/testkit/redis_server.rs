//! A throw-away `redis-server` on a loopback port, for tests and measurements of the shared
//! (Redis) cold tier. The binary comes from the Debian package that `scripts/setup-redis`
//! installs (`make test` runs it); `ATTNCACHE_REDIS_SERVER` may name another one.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// A running `redis-server` without persistence, killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
}

impl RedisServer {
    /// The `redis-server` binary: `$ATTNCACHE_REDIS_SERVER`, else the one on `PATH`.
    pub fn binary() -> anyhow::Result<PathBuf> {
        if let Some(p) = std::env::var_os("ATTNCACHE_REDIS_SERVER") {
            return Ok(PathBuf::from(p));
        }
        std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .map(|d| d.join("redis-server"))
            .find(|p| p.is_file())
            .context("redis-server not found on PATH: run scripts/setup-redis (make test does)")
    }

    /// Starts a server on a free loopback port and waits until it answers `PING`.
    pub fn start() -> anyhow::Result<Self> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_on(port)
    }

    /// Starts a server on `port` (e.g. again, after [`RedisServer::kill`]).
    pub fn start_on(port: u16) -> anyhow::Result<Self> {
        let child = Command::new(Self::binary()?)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args([
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start redis-server")?;
        let mut server = Self {
            child: Some(child),
            port,
        };
        let deadline = Instant::now() + Duration::from_secs(15);
        while !server.answers() {
            if Instant::now() > deadline {
                server.kill();
                anyhow::bail!("redis-server on port {port} did not answer PING within 15 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Whether it answers `PING` with `+PONG`.
    pub fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 7];
        s.write_all(b"PING\r\n").is_ok()
            && s.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG\r\n"
    }

    /// Kills the server at once (SIGKILL: no shutdown, like a crash).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}
