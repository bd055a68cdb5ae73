//! nginx in a pod's namespace: the web server the connection-rate runs hit
//! (what the kube-proxy figures in the issue were measured against).
use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::netns::Netns;

pub const HTTP_PORT: u16 = 80;

pub struct Nginx {
    child: Child,
}

impl Nginx {
    /// Serves `200 <name>` on port 80 of `ns`; files go under `dir`.
    pub fn start(ns: &Netns, name: &str, dir: &Path) -> Result<Self> {
        let dir: PathBuf = dir.join(format!("nginx-{name}"));
        std::fs::create_dir_all(dir.join("tmp"))?;
        let conf = dir.join("nginx.conf");
        let d = dir.display();
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 4096; }}\n\
                 http {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n\
                 server {{ listen {HTTP_PORT} backlog=4096; location / {{ return 200 \"{name}\\n\"; }} }}\n}}\n"
            ),
        )?;
        let child = super::pin(&mut Command::new("ip"), super::Cpu::Servers)
            .args(["netns", "exec", &ns.name, "nginx", "-e"])
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (is nginx-light installed? `cargo xtask setup`)")?;
        let nginx = Nginx { child };
        let deadline = Instant::now() + Duration::from_secs(5);
        let addr = SocketAddr::from(([127, 0, 0, 1], HTTP_PORT));
        while ns
            .run(|| std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)))?
            .is_err()
        {
            if Instant::now() > deadline {
                bail!(
                    "nginx did not start in {}: {}",
                    ns.name,
                    std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(nginx)
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SAFETY: plain kill(2) of our child (nginx's master, exec'd by ip netns exec).
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}
