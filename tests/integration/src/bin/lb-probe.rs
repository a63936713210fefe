//! A client process for the east-west tests, which run it inside a network namespace and a
//! cgroup (socket hooks apply per process, by cgroup, so it cannot be a thread of the test).
//!
//! `lb-probe tcp ADDR:PORT N`: N HTTP GETs, each on a new connection; prints one line per
//! request, `<peer> <body>`, where peer is what getpeername() says.
//! `lb-probe udp ADDR:PORT N`: N datagrams, each from a new unconnected socket; prints
//! `<source> <reply>` per reply, where source is what recvfrom() says.
//!
//! Exits with an error on the first failure.

use std::io::{BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::process::ExitCode;

use anyhow::{Context as _, Result, bail};
use lb_testbed::client::{TIMEOUT, read_response};

fn tcp(target: SocketAddr) -> Result<String> {
    let mut stream = TcpStream::connect_timeout(&target, TIMEOUT).context("connect")?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let peer = stream.peer_addr().context("getpeername")?;
    write!(
        stream,
        "GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .context("send")?;
    let body = read_response(&mut BufReader::new(stream)).context("response")?;
    Ok(format!("{peer} {body}"))
}

fn udp(target: SocketAddr, payload: &str) -> Result<String> {
    let any: IpAddr = if target.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((any, 0))?;
    socket.set_read_timeout(Some(TIMEOUT))?;
    socket.send_to(payload.as_bytes(), target).context("send")?;
    let mut buf = [0u8; 2048];
    let (n, from) = socket.recv_from(&mut buf).context("no reply")?;
    Ok(format!("{from} {}", String::from_utf8_lossy(&buf[..n])))
}

fn run(args: &[String]) -> Result<()> {
    let [mode, target, count] = args else {
        bail!("usage: lb-probe tcp|udp ADDR:PORT N");
    };
    let target: SocketAddr = target.parse().context("ADDR:PORT")?;
    let count: usize = count.parse().context("N")?;
    for i in 0..count {
        let line = match mode.as_str() {
            "tcp" => tcp(target),
            "udp" => udp(target, &format!("probe-{i}")),
            other => bail!("unknown mode {other:?}"),
        }
        .with_context(|| format!("{mode} {target}, request {i}"))?;
        println!("{line}");
    }
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-probe: {e:#}");
            ExitCode::FAILURE
        }
    }
}
