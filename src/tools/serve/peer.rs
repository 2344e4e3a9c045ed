//! Whether an HTTP client is still there. tiny_http does not hand out a request's socket, so the
//! kernel's view of the connection is read instead: Linux lists every TCP socket in
//! /proc/net/tcp and /proc/net/tcp6 with its state. Ours moves to CLOSE_WAIT when the client's FIN
//! arrives (it closed the connection) and leaves the table when a reset arrives (it was killed).
//! A client that half-closes its sending side and still waits for the answer would read as gone;
//! HTTP clients do not do that.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The kernel's TCP state number for CLOSE_WAIT (include/net/tcp_states.h).
const CLOSE_WAIT: &str = "08";

/// Whether the client at `peer`, connected to our `port`, has closed or reset its connection.
/// False where the tables cannot be read or show nothing of `port` (nothing is known then).
pub fn client_gone(peer: SocketAddr, port: u16) -> bool {
    let peer = canonical(peer);
    let mut port_listed = false;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else { continue };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state)) =
                (f.get(1).and_then(|a| parse(a)), f.get(2).and_then(|a| parse(a)), f.get(3))
            else {
                continue;
            };
            if local.port() != port {
                continue;
            }
            port_listed = true;
            if canonical(remote) == peer {
                return *state == CLOSE_WAIT;
            }
        }
    }
    // Our listening socket is listed, the connection is not: it was reset and closed.
    port_listed
}

/// IPv4 clients of an IPv6 socket appear as ::ffff:a.b.c.d; compare them as IPv4.
fn canonical(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(IpAddr::V4(v4), a.port()),
            None => a,
        },
        IpAddr::V4(_) => a,
    }
}

/// "0100007F:1F90" (IPv4) or 32 hex digits ":PORT" (IPv6): the address as 32-bit words in the
/// host's byte order, printed in hex, then the port in hex.
fn parse(field: &str) -> Option<SocketAddr> {
    let (addr, port) = field.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Option<Vec<[u8; 4]>> = addr
        .as_bytes()
        .chunks(8)
        .map(|w| std::str::from_utf8(w).ok().and_then(|w| u32::from_str_radix(w, 16).ok()).map(u32::to_ne_bytes))
        .collect();
    let bytes: Vec<u8> = words?.concat();
    let ip = match bytes.len() {
        4 => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
        16 => IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(bytes.as_slice()).ok()?)),
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};

    /// A connection's server side: open while the client is, gone once it closes.
    #[test]
    fn a_closed_client_reads_as_gone() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let client = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (mut server_side, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        if !std::path::Path::new("/proc/net/tcp").exists() {
            return; // not Linux: nothing to read
        }
        assert!(!client_gone(peer, port), "a connected client reads as gone");
        client.shutdown(Shutdown::Both).unwrap();
        drop(client);
        // The FIN has arrived once the server side reads end-of-stream.
        let mut buf = [0u8; 1];
        assert_eq!(server_side.read(&mut buf).unwrap(), 0);
        assert!(client_gone(peer, port), "a closed client reads as present");
        let _ = server_side.write_all(b"x");
    }

    #[test]
    fn parses_the_kernel_tables_address_forms() {
        let v4 = parse("0100007F:1F90").unwrap();
        assert_eq!(v4, "127.0.0.1:8080".parse().unwrap());
        // ::ffff:127.0.0.1 as /proc/net/tcp6 prints it on a little-endian host.
        if cfg!(target_endian = "little") {
            let v6 = parse("0000000000000000FFFF00000100007F:0050").unwrap();
            assert_eq!(canonical(v6), "127.0.0.1:80".parse().unwrap());
        }
        assert!(parse("zz:1").is_none() && parse("0100007F").is_none());
    }
}
