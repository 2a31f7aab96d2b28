//! The pods' tiny HTTP/1.1 server and an HTTP GET client that runs inside a network namespace.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream},
    path::Path,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinSet,
};

use super::netns::{in_netns, spawn_in_netns};
use crate::error::{LabError, Result};

/// How long a server waits for a client's request head.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest request head a server reads, and largest answer the client reads.
const MAX_HEAD: usize = 16 * 1024;
const MAX_ANSWER: usize = 1024 * 1024;

/// What a pod's server says about itself.
#[derive(Debug)]
pub(crate) struct Identity {
    pub(crate) cluster: String,
    pub(crate) namespace: String,
    pub(crate) pod: String,
    pub(crate) ip: Ipv4Addr,
}

impl Identity {
    /// The one-line body: `pod=<name> namespace=<ns> cluster=<cluster> ip=<pod IP> client=<source>`,
    /// where `<source>` is the client's address as this pod sees it (after any NAT).
    pub(crate) fn body(&self, client: IpAddr) -> String {
        format!(
            "pod={} namespace={} cluster={} ip={} client={client}\n",
            self.pod, self.namespace, self.cluster, self.ip
        )
    }
}

/// Binds `0.0.0.0:port` inside the network namespace at `netns`.
pub(crate) async fn bind(netns: &Path, port: u16) -> io::Result<tokio::net::TcpListener> {
    let std_listener = in_netns(netns, move || {
        let l = std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .await?;
    tokio::net::TcpListener::from_std(std_listener)
}

/// Answers every request on `listener` until the future is dropped, which also drops every open
/// connection.
pub(crate) async fn serve(listener: tokio::net::TcpListener, me: Arc<Identity>) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    connections.spawn(answer(stream, peer, me.clone()));
                }
                Err(e) => {
                    tracing::warn!(pod = %me.pod, "accepting a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn answer(mut stream: tokio::net::TcpStream, peer: SocketAddr, me: Arc<Identity>) {
    let exchange = async {
        let mut head = Vec::with_capacity(512);
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
            if head.len() > MAX_HEAD {
                let msg = "HTTP/1.1 431 Request Header Fields Too Large\r\nContent-Length: 0\r\n\
                           Connection: close\r\n\r\n";
                stream.write_all(msg.as_bytes()).await?;
                return stream.shutdown().await;
            }
        }
        let body = me.body(peer.ip());
        let response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
             Connection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    };
    match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(pod = %me.pod, %peer, "HTTP exchange failed: {e}"),
        Err(_) => tracing::debug!(pod = %me.pod, %peer, "HTTP client sent no request in time"),
    }
}

/// A parsed `http://<ip>[:port][/path]` URL.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
}

fn parse_url(url: &str) -> Result<Target, String> {
    let rest = url
        .strip_prefix("http://")
        .ok_or("only http:// URLs are supported")?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_owned()),
        Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
        None => (rest, "/".to_owned()),
    };
    if authority.contains('@') {
        return Err("user information in URLs is not supported".to_owned());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or("unclosed '[' in the host")?;
        let port = match after.strip_prefix(':') {
            Some(p) => Some(p),
            None if after.is_empty() => None,
            None => return Err(format!("unexpected {after:?} after the host")),
        };
        (h, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let ip: IpAddr = host.parse().map_err(|_| {
        format!("host {host:?} is not an IP address (there is no DNS inside lab pod namespaces)")
    })?;
    let port = match port {
        Some(p) => p.parse::<u16>().map_err(|_| format!("bad port {p:?}"))?,
        None => 80,
    };
    Ok(Target {
        addr: SocketAddr::new(ip, port),
        host: authority.to_owned(),
        path,
    })
}

/// Splits an HTTP/1.x answer into its status code, status line and (de-chunked) body.
fn parse_answer(raw: &[u8]) -> Result<(u16, String, String), String> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("the answer has no complete header")?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default().to_owned();
    let code = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|s| s.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| format!("not an HTTP/1 status line: {status_line:?}"))?;
    let mut length = None;
    let mut chunked = false;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
    }
    let mut body = &raw[end + 4..];
    let decoded;
    if chunked {
        decoded = dechunk(body)?;
        body = &decoded;
    } else if let Some(n) = length {
        if body.len() < n {
            return Err(format!(
                "the answer ended after {} of {n} body bytes",
                body.len()
            ));
        }
        body = &body[..n];
    }
    Ok((
        code,
        status_line,
        String::from_utf8_lossy(body).into_owned(),
    ))
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    loop {
        let eol = raw
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunked body")?;
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .map_err(|_| format!("bad chunk size {size_text:?}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if raw.len() < size + 2 {
            return Err("truncated chunked body".to_owned());
        }
        out.extend_from_slice(&raw[..size]);
        raw = &raw[size + 2..];
    }
}

fn exchange(target: &Target, timeout: Duration) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    let left = || {
        deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "timed out"))
    };
    let mut stream = TcpStream::connect_timeout(&target.addr, left()?)
        .map_err(|e| io::Error::new(e.kind(), format!("connecting to {}: {e}", target.addr)))?;
    stream.set_write_timeout(Some(left()?))?;
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: liqo-lab\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        target.path, target.host
    );
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        stream.set_read_timeout(Some(left()?))?;
        let n = match stream.read(&mut buf) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no complete answer from {} in time", target.addr),
                ));
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Ok(raw);
        }
        raw.extend_from_slice(&buf[..n]);
        if raw.len() > MAX_ANSWER {
            return Err(io::Error::other(format!(
                "the answer is larger than {MAX_ANSWER} bytes"
            )));
        }
    }
}

/// Sends `GET url` from inside the network namespace at `netns` (e.g. a pod's, see
/// [`PodNetwork::netns_path`](crate::PodNetwork)) and returns the body of a 2xx answer.
///
/// `url` is `http://<IP>[:port][/path]`: there is no DNS in the lab's namespaces. The whole
/// exchange (connect, request, answer) must finish within `timeout`. The request runs on a thread
/// of its own that enters the namespace, so the caller's threads never change namespace.
pub async fn http_get_in(netns: &Path, url: &str, timeout: Duration) -> Result<String> {
    let fail = |message: String| LabError::Http {
        netns: netns.display().to_string(),
        url: url.to_owned(),
        message,
    };
    let target = parse_url(url).map_err(fail)?;
    if !netns.exists() {
        return Err(fail("the network namespace does not exist".to_owned()));
    }
    let rx = spawn_in_netns(netns, move || exchange(&target, timeout));
    let raw = match tokio::time::timeout(timeout + Duration::from_secs(2), rx).await {
        Ok(Ok(Ok(raw))) => raw,
        Ok(Ok(Err(e))) => return Err(fail(e.to_string())),
        Ok(Err(_)) => return Err(fail("the request thread did not start".to_owned())),
        Err(_) => return Err(fail(format!("no answer within {timeout:?}"))),
    };
    let (code, status, body) = parse_answer(&raw).map_err(fail)?;
    if (200..300).contains(&code) {
        Ok(body)
    } else {
        let mut shown: String = body.chars().take(200).collect();
        if shown.len() < body.len() {
            shown.push('…');
        }
        Err(fail(format!("answered {status:?}: {}", shown.trim())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls() {
        let t = parse_url("http://10.0.0.1:8080/a?b").expect("url");
        assert_eq!(t.addr, "10.0.0.1:8080".parse().expect("addr"));
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("10.0.0.1:8080", "/a?b")
        );
        let t = parse_url("http://10.0.0.1").expect("url");
        assert_eq!((t.addr.port(), t.path.as_str()), (80, "/"));
        let t = parse_url("http://[fd00::1]:81?x").expect("url");
        assert_eq!((t.addr.port(), t.path.as_str()), (81, "/?x"));
        for bad in [
            "https://10.0.0.1/",
            "http://example.com/",
            "http://10.0.0.1:x/",
            "http://u@10.0.0.1/",
            "10.0.0.1",
        ] {
            assert!(parse_url(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn parses_answers() {
        let (code, _, body) =
            parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcdef").expect("ok");
        assert_eq!((code, body.as_str()), (200, "abc"));
        let (code, _, body) = parse_answer(
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n1\r\nd\r\n0\r\n\r\n",
        )
        .expect("ok");
        assert_eq!((code, body.as_str()), (404, "abcd"));
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\n").is_err());
        assert!(parse_answer(b"SSH-2.0\r\n\r\n").is_err());
        assert!(parse_answer(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
    }

    #[test]
    fn body_is_one_line() {
        let me = Identity {
            cluster: "a".into(),
            namespace: "ns".into(),
            pod: "p".into(),
            ip: Ipv4Addr::new(10, 244, 0, 5),
        };
        assert_eq!(
            me.body("10.244.1.2".parse().expect("ip")),
            "pod=p namespace=ns cluster=a ip=10.244.0.5 client=10.244.1.2\n"
        );
    }
}
