//! Listening sockets handed over by the process that started fairway, and readiness notices
//! to systemd (CONTRACT §9).
//!
//! Two parents hand sockets over, both in systemd's form: systemd itself (socket activation:
//! `LISTEN_FDS` sockets from fd 3 on, `LISTEN_PID` naming this process, `LISTEN_FDNAMES`),
//! and an older fairway upgrading to this one on `SIGUSR2` (the same variables, without
//! `LISTEN_PID`, which it cannot know before the fork; see `upgrade`). A socket is used for
//! the `listen` address it is bound to; one bound to another port is used for an address
//! with port 0 of the same role (`client`, `admin`, `redirect`, its name in
//! `LISTEN_FDNAMES`), so that a proxy started on port 0 keeps its ports across an upgrade.

use std::net::SocketAddr;
use std::sync::Mutex;

/// What a listening socket serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `server.listen`.
    Client,
    /// `admin.listen`.
    Admin,
    /// `server.redirect_http`.
    Redirect,
}

impl Role {
    /// The name in `LISTEN_FDNAMES`.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Admin => "admin",
            Role::Redirect => "redirect",
        }
    }
}

/// Sockets handed over and not used yet.
#[derive(Debug, Default)]
pub struct Inherited {
    sockets: Vec<Socket>,
}

#[derive(Debug)]
struct Socket {
    name: Option<String>,
    local: SocketAddr,
    listener: std::net::TcpListener,
}

/// The sockets of this process's start, until the first app takes them.
static ADOPTED: Mutex<Option<Inherited>> = Mutex::new(None);

/// Takes the sockets `LISTEN_FDS` hands over, for the first [`take_adopted`]. Call it before
/// any other thread runs: reading the variables also removes `LISTEN_FDS` and `LISTEN_PID`
/// from the environment (as `sd_listen_fds(1)` does). Returns what was taken and what was
/// refused (not a listening TCP socket), for the log.
pub fn adopt_from_env() -> (usize, Vec<String>) {
    let names: Vec<String> = std::env::var("LISTEN_FDNAMES")
        .map(|s| s.split(':').map(str::to_owned).collect())
        .unwrap_or_default();
    let mut fds = listenfd::ListenFd::from_env();
    let mut sockets = Vec::new();
    let mut refused = Vec::new();
    for i in 0..fds.len() {
        let taken = fds.take_tcp_listener(i).and_then(|l| match l {
            Some(l) => {
                l.set_nonblocking(true)?;
                let local = l.local_addr()?;
                Ok(Some((l, local)))
            }
            None => Ok(None),
        });
        match taken {
            Ok(Some((listener, local))) => sockets.push(Socket {
                name: names.get(i).filter(|n| !n.is_empty()).cloned(),
                local,
                listener,
            }),
            Ok(None) => {}
            Err(e) => refused.push(format!("fd {}: {e}", 3 + i)),
        }
    }
    let n = sockets.len();
    *lock() = Some(Inherited { sockets });
    (n, refused)
}

fn lock() -> std::sync::MutexGuard<'static, Option<Inherited>> {
    ADOPTED.lock().unwrap_or_else(|e| e.into_inner())
}

/// The sockets [`adopt_from_env`] took; empty for every later caller (an app started in the
/// same process, as tests do).
pub fn take_adopted() -> Inherited {
    lock().take().unwrap_or_default()
}

impl Inherited {
    /// A socket for `addr`: the one bound to it, or for port 0, one of `role` on the same IP.
    pub fn take(&mut self, addr: SocketAddr, role: Role) -> Option<std::net::TcpListener> {
        let i = self
            .sockets
            .iter()
            .position(|s| s.local == addr)
            .or_else(|| {
                (addr.port() == 0).then_some(())?;
                self.sockets.iter().position(|s| {
                    s.name.as_deref() == Some(role.name()) && s.local.ip() == addr.ip()
                })
            })?;
        Some(self.sockets.remove(i).listener)
    }

    /// The sockets for client address `addr`: the one [`Inherited::take`] finds, with every
    /// other socket bound to the same address (the rest of its `SO_REUSEPORT` group).
    pub fn take_group(&mut self, addr: SocketAddr, role: Role) -> Vec<std::net::TcpListener> {
        let Some(first) = self.take(addr, role) else {
            return Vec::new();
        };
        let Ok(local) = first.local_addr() else {
            return vec![first];
        };
        let mut group = vec![first];
        while let Some(i) = self.sockets.iter().position(|s| s.local == local) {
            group.push(self.sockets.remove(i).listener);
        }
        group
    }

    /// The addresses of the sockets left over (closed when this is dropped).
    pub fn leftover(&self) -> Vec<SocketAddr> {
        self.sockets.iter().map(|s| s.local).collect()
    }
}

/// Sends `state` (`READY=1`, `STOPPING=1`, `MAINPID=N`) to systemd when it asked for notices
/// (`NOTIFY_SOCKET`, with `Type=notify`); does nothing otherwise.
pub fn notify(state: &str) {
    let Ok(path) = std::env::var("NOTIFY_SOCKET") else {
        return;
    };
    let Ok(socket) = std::os::unix::net::UnixDatagram::unbound() else {
        return;
    };
    let sent = match path.strip_prefix('@') {
        // An abstract socket (Linux).
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
                .and_then(|a| socket.send_to_addr(state.as_bytes(), &a))
        }
        None => socket.send_to(state.as_bytes(), &path),
    };
    if let Err(e) = sent {
        tracing::warn!(error = %e, socket = %path, "could not notify systemd");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn socket(name: Option<&str>) -> Socket {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        Socket {
            name: name.map(str::to_owned),
            local: listener.local_addr().unwrap(),
            listener,
        }
    }

    #[test]
    fn a_socket_goes_to_its_address_then_to_port_0_of_its_role() {
        let client = socket(Some("client"));
        let admin = socket(Some("admin"));
        let (c, a) = (client.local, admin.local);
        let mut i = Inherited {
            sockets: vec![client, admin],
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        assert_eq!(
            i.take(any, Role::Redirect).map(|l| l.local_addr().unwrap()),
            None
        );
        assert_eq!(
            i.take(a, Role::Client).map(|l| l.local_addr().unwrap()),
            Some(a),
            "the exact address, whatever the name"
        );
        let other_ip: SocketAddr = "127.0.0.2:0".parse().unwrap();
        assert!(i.take(other_ip, Role::Client).is_none());
        assert_eq!(
            i.take(any, Role::Client).map(|l| l.local_addr().unwrap()),
            Some(c)
        );
        assert!(i.leftover().is_empty());
    }

    #[test]
    fn a_group_is_taken_whole() {
        let first = socket(Some("client"));
        let local = first.local;
        let alone = socket(Some("client"));
        // The rest of the group: sockets bound to the same address (the test stands them in
        // with duplicates of the first).
        let rest: Vec<Socket> = (0..2)
            .map(|_| Socket {
                name: Some("client".to_owned()),
                local,
                listener: first.listener.try_clone().unwrap(),
            })
            .collect();
        let mut i = Inherited {
            sockets: [first, alone].into_iter().chain(rest).collect(),
        };
        let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let group = i.take_group(any, Role::Client);
        assert_eq!(group.len(), 3);
        assert!(group.iter().all(|l| l.local_addr().unwrap() == local));
        assert_eq!(i.take_group(any, Role::Client).len(), 1);
        assert!(i.take_group(any, Role::Client).is_empty());
        assert!(i.leftover().is_empty());
    }
}
