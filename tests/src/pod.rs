//! A pod's workload: a TCP and UDP server that answers every request line
//! (or datagram) with `<pod name> <peer ip>:<peer port>`, so a test can see
//! which backend it reached and which source address that backend saw.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::Duration,
};

use anyhow::{Context, Result};

use crate::netns::Netns;

pub struct PodServer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl PodServer {
    pub fn start(ns: &Netns, pod_name: &str, port: u16) -> Result<Self> {
        let (tcp, udp) = ns.run(|| -> Result<_> {
            let tcp = TcpListener::bind(("0.0.0.0", port)).context("binding TCP")?;
            let udp = UdpSocket::bind(("0.0.0.0", port)).context("binding UDP")?;
            Ok((tcp, udp))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(50)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let name = pod_name.to_owned();
        let tcp_thread = {
            let (stop, name) = (stop.clone(), name.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((conn, peer)) => {
                            let (stop, name) = (stop.clone(), name.clone());
                            std::thread::spawn(move || serve_connection(conn, peer, &name, &stop));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(5)),
                    }
                }
            })
        };
        let udp_thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 2048];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((_, peer)) = udp.recv_from(&mut buf) {
                        let _ = udp.send_to(answer(&name, peer).as_bytes(), peer);
                    }
                }
            })
        };
        Ok(PodServer {
            stop,
            threads: vec![tcp_thread, udp_thread],
        })
    }
}

fn answer(pod: &str, peer: SocketAddr) -> String {
    format!("{pod} {peer}\n")
}

fn serve_connection(conn: TcpStream, peer: SocketAddr, pod: &str, stop: &AtomicBool) {
    let _ = conn.set_read_timeout(Some(Duration::from_millis(100)));
    let Ok(mut writer) = conn.try_clone() else { return };
    let mut reader = BufReader::new(conn);
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) if line.ends_with('\n') => {
                if writer.write_all(answer(pod, peer).as_bytes()).is_err() {
                    return;
                }
                // The server closes first, as HTTP/1.0 servers do: the
                // tuple's TIME_WAIT is then the pod's.
                if line == LAST_REQUEST {
                    return;
                }
                line.clear();
            }
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Drop for PodServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// What a pod server answered: who it is and whom it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub pod: String,
    pub peer: SocketAddr,
}

impl Reply {
    pub fn parse(line: &str) -> Result<Self> {
        let (pod, peer) = line
            .trim()
            .split_once(' ')
            .with_context(|| format!("unexpected answer {line:?}"))?;
        Ok(Reply {
            pod: pod.to_owned(),
            peer: peer.parse()?,
        })
    }
}

/// A request the pod server answers and then closes the connection.
const LAST_REQUEST: &str = "bye\n";

/// A client connection that stays open, for requests over one flow.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    fn over(stream: TcpStream) -> Result<Self> {
        stream.set_read_timeout(Some(TIMEOUT))?;
        Ok(Conn {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
        })
    }

    pub fn request(&mut self) -> Result<Reply> {
        self.writer.write_all(b"hello\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line).context("reading the answer")?;
        Reply::parse(&line)
    }

    /// A last request, after which the server closes first (and so keeps
    /// the tuple in TIME_WAIT); returns once the server has closed.
    pub fn last_request(mut self) -> Result<Reply> {
        self.writer.write_all(LAST_REQUEST.as_bytes())?;
        let mut line = String::new();
        self.reader.read_line(&mut line).context("reading the answer")?;
        let reply = Reply::parse(&line)?;
        let mut rest = Vec::new();
        self.reader
            .read_to_end(&mut rest)
            .context("waiting for the server to close")?;
        Ok(reply)
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.writer.local_addr().expect("connected")
    }
}

pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Opens a TCP connection from inside `ns`.
pub fn connect(ns: &Netns, to: SocketAddr) -> Result<Conn> {
    let stream = ns
        .run(|| TcpStream::connect_timeout(&to, TIMEOUT))?
        .with_context(|| format!("connecting to {to}"))?;
    Conn::over(stream)
}

/// Opens a TCP connection from inside `ns`, from source port `port`.
pub fn connect_from(ns: &Netns, port: u16, to: SocketAddr) -> Result<Conn> {
    let stream = ns
        .run(|| -> std::io::Result<TcpStream> {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.set_reuse_address(true)?;
            socket.bind(&SocketAddr::from(([0, 0, 0, 0], port)).into())?;
            socket.connect_timeout(&to.into(), TIMEOUT)?;
            Ok(socket.into())
        })?
        .with_context(|| format!("connecting to {to} from port {port}"))?;
    Conn::over(stream)
}

/// A UDP socket bound in `ns` to its own source port.
pub struct Datagrams(UdpSocket);

impl Datagrams {
    pub fn open(ns: &Netns) -> Result<Self> {
        let socket = ns.run(|| UdpSocket::bind("0.0.0.0:0"))??;
        socket.set_read_timeout(Some(TIMEOUT))?;
        Ok(Datagrams(socket))
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.0.local_addr().expect("bound")
    }

    /// The socket itself, for exchanges `request` does not make.
    pub fn socket(&self) -> &UdpSocket {
        &self.0
    }

    pub fn request(&self, to: SocketAddr) -> Result<Reply> {
        self.0.send_to(b"hello\n", to)?;
        let mut buf = [0u8; 512];
        // A signal arriving meanwhile (a socket with a timeout is never
        // restarted) is not the answer's absence: wait on.
        let (n, from) = loop {
            match self.0.recv_from(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => break other,
            }
        }
        .with_context(|| format!("no UDP answer from {to}"))?;
        anyhow::ensure!(
            from == to,
            "answer came from {from}, not from {to}: reply not reverse-translated"
        );
        Reply::parse(&String::from_utf8_lossy(&buf[..n]))
    }
}

/// A plain HTTP/1.0 GET from inside `ns`: (status code, body).
pub fn http_get(ns: &Netns, to: SocketAddr, path: &str) -> Result<(u16, String)> {
    let stream = ns
        .run(|| TcpStream::connect_timeout(&to, TIMEOUT))?
        .with_context(|| format!("connecting to {to}"))?;
    proxy_user::telemetry::http_get(stream, to, path, TIMEOUT)
}
