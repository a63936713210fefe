//! Clients that send real traffic from a namespace, with timeouts.

use std::io::{BufRead, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::netns::Netns;

/// How long a client waits to connect, and then for each read or write.
pub const TIMEOUT: Duration = Duration::from_secs(3);

/// Sends `GET /` over a new TCP connection from `ns` to `addr:port` (with `Connection: close`)
/// and returns the response body and the peer address of the connection. Fails unless the
/// response is `200 OK`.
pub fn http_get(ns: &Netns, addr: impl Into<IpAddr>, port: u16) -> Result<(String, SocketAddr)> {
    let target = SocketAddr::new(addr.into(), port);
    let (status, body, peer) = http_request(ns, target, "/")?;
    ensure!(
        status == 200,
        "GET / from {target}: status {status}: {body:?}"
    );
    Ok((body, peer))
}

/// Sends `GET path` over a new TCP connection from `ns` to `target` (with `Connection:
/// close`) and returns the status code, the body and the peer address of the connection.
pub fn http_request(
    ns: &Netns,
    target: SocketAddr,
    path: &str,
) -> Result<(u16, String, SocketAddr)> {
    let get = || -> Result<(u16, String, SocketAddr)> {
        let mut stream = TcpStream::connect_timeout(&target, TIMEOUT)
            .with_context(|| format!("connect (timeout {TIMEOUT:?})"))?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        stream.set_write_timeout(Some(TIMEOUT))?;
        let peer = stream.peer_addr()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
        )
        .context("send request")?;
        let mut response = String::new();
        stream
            .read_to_string(&mut response)
            .with_context(|| format!("read response (timeout {TIMEOUT:?})"))?;
        let (status, body) = parse_response(&response)?;
        Ok((status, body, peer))
    };
    ns.run(get)?
        .with_context(|| format!("HTTP GET http://{target}{path} from {}", ns.name()))
}

/// The status and body of a complete response with a Content-Length.
fn parse_response(response: &str) -> Result<(u16, String)> {
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("incomplete response {response:?}"))?;
    let status = status_code(head).with_context(|| format!("response {response:?}"))?;
    let length = content_length(head).with_context(|| format!("response {response:?}"))?;
    ensure!(
        body.len() == length,
        "body of {} bytes, Content-Length {length}",
        body.len()
    );
    Ok((status, body.to_owned()))
}

/// The status code of a response's head (status line and headers).
fn status_code(head: &str) -> Result<u16> {
    head.strip_prefix("HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse::<u16>().ok())
        .context("no HTTP/1.1 status line")
}

/// The Content-Length of a response's head.
pub fn content_length(head: &str) -> Result<usize> {
    head.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse::<usize>().ok())?
        })
        .context("no Content-Length")
}

/// Reads one `200 OK` response with a Content-Length from a kept-alive connection and
/// returns its body. I/O errors keep their kind (`ConnectionReset`, `WouldBlock` for a read
/// timeout, ...); a stream that ends before the whole response is `UnexpectedEof`; a response
/// that is not `200 OK` with a Content-Length is `InvalidData`.
pub fn read_response(reader: &mut impl BufRead) -> std::io::Result<String> {
    use std::io::{Error, ErrorKind};
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(ErrorKind::UnexpectedEof.into());
        }
        if line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let length = status_code(&head)
        .and_then(|status| {
            ensure!(status == 200, "status {status}");
            content_length(&head)
        })
        .map_err(|e| Error::new(ErrorKind::InvalidData, format!("{e:#}: {head:?}")))?;
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    String::from_utf8(body).map_err(|e| Error::new(ErrorKind::InvalidData, e))
}

/// Sends one datagram `payload` from a new socket (so a new flow, with a new source port) in
/// `ns` to `addr:port` and returns the reply. Fails unless the reply comes from `addr:port`.
pub fn udp_request(
    ns: &Netns,
    addr: impl Into<IpAddr>,
    port: u16,
    payload: &str,
) -> Result<String> {
    let target = SocketAddr::new(addr.into(), port);
    let request = || -> Result<String> {
        // Not connected: a connected socket would silently drop a reply from another address.
        let any: IpAddr = if target.is_ipv6() {
            Ipv6Addr::UNSPECIFIED.into()
        } else {
            Ipv4Addr::UNSPECIFIED.into()
        };
        let socket = UdpSocket::bind((any, 0))?;
        socket.set_read_timeout(Some(TIMEOUT))?;
        socket.send_to(payload.as_bytes(), target).context("send")?;
        let mut buf = [0u8; 2048];
        let (n, from) = socket
            .recv_from(&mut buf)
            .with_context(|| format!("no reply within {TIMEOUT:?}"))?;
        let reply = String::from_utf8_lossy(&buf[..n]).into_owned();
        if from != target {
            bail!("reply {reply:?} came from {from}, not from {target}");
        }
        Ok(reply)
    };
    ns.run(request)?
        .with_context(|| format!("UDP {payload:?} to {target} from {}", ns.name()))
}

/// How many requests each backend answered, by backend (pod) name.
pub type Tally = std::collections::BTreeMap<String, usize>;

/// Sends `n` HTTP GETs (each a new connection) and counts who answered. Fails on the first
/// request that fails.
pub fn http_tally(ns: &Netns, addr: impl Into<IpAddr>, port: u16, n: usize) -> Result<Tally> {
    let addr = addr.into();
    let mut tally = Tally::new();
    for i in 0..n {
        let (body, _) = http_get(ns, addr, port).with_context(|| format!("request {i} of {n}"))?;
        *tally.entry(body).or_default() += 1;
    }
    Ok(tally)
}

/// Sends `n` UDP datagrams (each from a new socket, so a new flow) and counts who answered.
/// Fails on the first request that fails or whose reply does not echo its payload.
pub fn udp_tally(ns: &Netns, addr: impl Into<IpAddr>, port: u16, n: usize) -> Result<Tally> {
    let addr = addr.into();
    let mut tally = Tally::new();
    for i in 0..n {
        let payload = format!("request-{i}");
        let reply = udp_request(ns, addr, port, &payload)?;
        let backend = reply
            .strip_suffix(&payload)
            .and_then(|r| r.strip_suffix(':'))
            .with_context(|| format!("reply {reply:?} to {payload:?} is not <pod>:{payload}"))?;
        *tally.entry(backend.to_owned()).or_default() += 1;
    }
    Ok(tally)
}

/// Fails unless every one of `backends` answered at least once, and nobody else did.
pub fn ensure_all_served(tally: &Tally, backends: &[String]) -> Result<()> {
    for who in tally.keys() {
        ensure!(
            backends.contains(who),
            "unknown backend {who:?} answered: {tally:?}"
        );
    }
    for backend in backends {
        ensure!(
            tally.contains_key(backend),
            "{backend} served nothing: {tally:?}"
        );
    }
    Ok(())
}
