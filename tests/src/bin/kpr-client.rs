//! A TCP client to run as its own process inside a test cluster's cgroup
//! (where the socket-level balancer acts, unlike in the test process):
//! `kpr-client ADDR COUNT [hold]` opens COUNT connections, keeps them all
//! open, asks each pod server who it is, and prints one line per
//! connection: `<pod> <address the server saw> <getpeername()>`, or
//! `error <why>`. With `hold`, the connections stay open until its stdin
//! closes.
use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    time::Duration,
};

use anyhow::{Context, Result};

fn ask(to: SocketAddr) -> Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&to, Duration::from_secs(3))?;
    stream.set_read_timeout(Some(Duration::from_secs(3)))?;
    (&stream).write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    let peer = stream.peer_addr()?;
    Ok((stream, format!("{} {peer}", line.trim())))
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let to: SocketAddr = args.next().context("usage: kpr-client ADDR COUNT")?.parse()?;
    let count: usize = args.next().context("usage: kpr-client ADDR COUNT")?.parse()?;
    let hold = args.next().as_deref() == Some("hold");
    let mut open = Vec::new();
    for _ in 0..count {
        match ask(to) {
            Ok((stream, line)) => {
                println!("{line}");
                open.push(stream);
            }
            Err(e) => println!("error {e}"),
        }
    }
    if hold {
        std::io::stdout().flush()?;
        std::io::stdin().read_to_end(&mut Vec::new())?;
    }
    drop(open);
    Ok(())
}
