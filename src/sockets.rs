//! The bound listeners (client and admin), reconciled by diff: on reload, addresses that
//! stay keep their socket, new ones are bound before anything changes (a bind failure
//! fails the reload), and removed ones stop accepting while their connections drain. A
//! socket handed over at start (`inherit`) is used instead of binding its address; every
//! socket can be handed over to a new process ([`ListenerSet::handover`]).
//!
//! A client address is bound once per worker on Linux: a group of `SO_REUSEPORT` sockets,
//! among which the kernel spreads new connections, so that each worker waits on a queue of
//! its own and a new connection wakes one worker, not all of them ([`bind_group`]). The
//! group is handed over whole, so no socket of it, and no connection queued on one, is
//! closed by an upgrade.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Addr, Config};
use crate::connection;
use crate::context::Context;
use crate::inherit::{Inherited, Role};

/// A listen address that failed to bind.
#[derive(Debug, thiserror::Error)]
#[error("{key}: cannot listen on {addr}: {source}")]
pub struct BindError {
    /// `server.listen` or `admin.listen`.
    pub key: &'static str,
    /// The address.
    pub addr: SocketAddr,
    /// Why.
    #[source]
    pub source: io::Error,
}

/// One accepting socket.
#[derive(Debug)]
struct Bound {
    /// As written in the config (port 0 included).
    configured: SocketAddr,
    /// As bound.
    local: SocketAddr,
    /// What it serves.
    role: Role,
    /// The listening sockets themselves (duplicates of the accept loops'), to hand over:
    /// one, or a client address's group.
    fds: Vec<OwnedFd>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The client listeners and the admin listener.
#[derive(Debug, Default)]
pub struct ListenerSet {
    client: Vec<Bound>,
    admin: Option<Bound>,
    redirect: Option<Bound>,
    /// Sockets handed over at start, used before binding.
    inherited: Inherited,
}

/// Sockets bound for a new config, not yet accepting. Dropping it releases them.
#[derive(Debug)]
pub struct Prepared {
    /// `None`: keep the sockets already bound to that address.
    client: Vec<(SocketAddr, Option<Vec<std::net::TcpListener>>)>,
    admin: Option<(SocketAddr, Option<std::net::TcpListener>)>,
    redirect: Option<(SocketAddr, Option<std::net::TcpListener>)>,
}

/// Binds like Nginx: `SO_REUSEADDR`, IPv6 sockets IPv6 only, a backlog of 1024,
/// non-blocking.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    listen_on(unbound(addr)?, addr)
}

/// Binds `socket` to `addr` and listens, with a backlog of 1024, non-blocking.
fn listen_on(socket: Socket, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// A TCP socket for `addr`'s family, with `SO_REUSEADDR`, IPv6 only if IPv6.
fn unbound(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]:80` beside `0.0.0.0:80`, as Nginx's `ipv6only=on`.
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// Binds `addr` `n` times on Linux, as Nginx's `reuseport`: `SO_REUSEPORT` sockets of one
/// group, each with a backlog of its own, among which the kernel spreads new connections
/// by their addresses. Elsewhere, or for one worker, one socket as [`bind`].
///
/// A group would also take in a socket that another process binds with `SO_REUSEPORT`
/// (of the same user), and share the address's connections with it without a word. So the
/// address is first bound alone, without the option, which fails as any bind does if
/// something listens there already; that socket is closed before the group is bound to
/// the port it got (the one asked for, or the one the kernel picked for port 0).
fn bind_group(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    if n <= 1 || !cfg!(target_os = "linux") {
        return Ok(vec![bind(addr)?]);
    }
    let alone = unbound(addr)?;
    alone.bind(&addr.into())?;
    let local = alone
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::other("bound to a non-IP address"))?;
    drop(alone);
    (0..n)
        .map(|_| {
            let socket = unbound(local)?;
            socket.set_reuse_port(true)?;
            listen_on(socket, local)
        })
        .collect()
}

impl ListenerSet {
    /// No listener yet; `inherited` sockets are used before binding.
    pub fn with_inherited(inherited: Inherited) -> ListenerSet {
        ListenerSet {
            inherited,
            ..ListenerSet::default()
        }
    }

    /// The socket for `addr`: a handed-over one, else a new one.
    fn obtain(&mut self, addr: SocketAddr, role: Role) -> io::Result<std::net::TcpListener> {
        match self.inherited.take(addr, role) {
            Some(l) => {
                tracing::info!(listen = %addr, role = role.name(), "using a socket handed over at start");
                Ok(l)
            }
            None => bind(addr),
        }
    }

    /// The sockets for client address `addr`: the group handed over at start (or the one
    /// socket systemd bound), else a new group of one socket per worker.
    fn obtain_group(&mut self, addr: SocketAddr) -> io::Result<Vec<std::net::TcpListener>> {
        let group = self.inherited.take_group(addr, Role::Client);
        if group.is_empty() {
            return bind_group(addr, crate::workers::count());
        }
        if group.len() == 1 {
            tracing::info!(listen = %addr, role = "client", "using a socket handed over at start");
        } else {
            tracing::info!(listen = %addr, sockets = group.len(), "using sockets handed over at start");
        }
        Ok(group)
    }

    /// Closes the handed-over sockets that no `listen` address took (after the first
    /// config is in force).
    pub fn close_leftovers(&mut self) {
        let left = std::mem::take(&mut self.inherited);
        for addr in left.leftover() {
            tracing::warn!(socket = %addr, "a socket handed over at start matches no listen address: closed");
        }
    }

    /// Binds every address of `cfg` that is not bound yet.
    pub fn prepare(&mut self, cfg: &Config) -> Result<Prepared, BindError> {
        let mut client = Vec::new();
        for &addr in &cfg.server.listen.0 {
            let kept = self.client.iter().any(|b| b.configured == addr);
            let fresh = if kept {
                None
            } else {
                Some(self.obtain_group(addr).map_err(|source| BindError {
                    key: "server.listen",
                    addr,
                    source,
                })?)
            };
            client.push((addr, fresh));
        }
        let admin = self.single(Role::Admin, cfg.admin.listen, "admin.listen")?;
        let redirect = self.single(
            Role::Redirect,
            cfg.server.redirect_http,
            "server.redirect_http",
        )?;
        Ok(Prepared {
            client,
            admin,
            redirect,
        })
    }

    /// The admin or redirect socket `want` asks for: kept, or new.
    #[allow(clippy::type_complexity)]
    fn single(
        &mut self,
        role: Role,
        want: Option<Addr>,
        key: &'static str,
    ) -> Result<Option<(SocketAddr, Option<std::net::TcpListener>)>, BindError> {
        let Some(Addr(addr)) = want else {
            return Ok(None);
        };
        let current = match role {
            Role::Admin => &self.admin,
            _ => &self.redirect,
        };
        if current.as_ref().is_some_and(|b| b.configured == addr) {
            return Ok(Some((addr, None)));
        }
        self.obtain(addr, role)
            .map(|l| Some((addr, Some(l))))
            .map_err(|source| BindError { key, addr, source })
    }

    /// Duplicates of every listening socket with what each serves, for a new process to
    /// accept on.
    pub fn handover(&self) -> io::Result<Vec<(Role, OwnedFd)>> {
        self.client
            .iter()
            .chain(&self.admin)
            .chain(&self.redirect)
            .flat_map(|b| b.fds.iter().map(|fd| Ok((b.role, fd.try_clone()?))))
            .collect()
    }

    /// Starts accepting on the newly bound sockets and stops the ones `prepared` no longer
    /// lists. Connections already accepted are not touched.
    pub fn commit(
        &mut self,
        prepared: Prepared,
        ctx: &Arc<Context>,
        admin: &dyn Fn(tokio::net::TcpListener, CancellationToken) -> JoinHandle<()>,
    ) -> io::Result<()> {
        let mut old = std::mem::take(&mut self.client);
        for (configured, fresh) in prepared.client {
            match fresh {
                None => {
                    if let Some(i) = old.iter().position(|b| b.configured == configured) {
                        self.client.push(old.remove(i));
                    }
                }
                Some(group) => {
                    let fds = group
                        .iter()
                        .map(|l| l.as_fd().try_clone_to_owned())
                        .collect::<io::Result<Vec<_>>>()?;
                    let local = group
                        .first()
                        .ok_or_else(|| io::Error::other("no socket"))?
                        .local_addr()?;
                    let stop = ctx.stop.child_token();
                    let task = accept_on_workers(group, ctx, &stop)?;
                    tracing::info!(listen = %local, "accepting client connections");
                    self.client.push(Bound {
                        configured,
                        local,
                        role: Role::Client,
                        fds,
                        stop,
                        task,
                    });
                }
            }
        }
        for b in old {
            tracing::info!(listen = %b.local, "no longer listening (removed from the config)");
            b.stop.cancel();
        }
        self.admin = commit_single(self.admin.take(), prepared.admin, Role::Admin, ctx, admin)?;
        self.redirect = commit_single(
            self.redirect.take(),
            prepared.redirect,
            Role::Redirect,
            ctx,
            admin,
        )?;
        Ok(())
    }

    /// The bound client addresses, in config order.
    pub fn client_addrs(&self) -> Vec<SocketAddr> {
        self.client.iter().map(|b| b.local).collect()
    }

    /// The bound admin address.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|b| b.local)
    }

    /// The bound `redirect_http` address.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect.as_ref().map(|b| b.local)
    }

    /// Stops every listener; the returned tasks end once their sockets are closed.
    pub fn stop_all(&mut self) -> Vec<JoinHandle<()>> {
        let mut tasks = Vec::new();
        for b in self
            .client
            .drain(..)
            .chain(self.admin.take())
            .chain(self.redirect.take())
        {
            b.stop.cancel();
            tasks.push(b.task);
        }
        tasks
    }
}

/// Starts the accept loops of one client address, each on a duplicate of one of its
/// sockets: worker `i` on socket `i`, as many loops as there are workers or sockets,
/// whichever is more. Every worker accepts, and every socket is accepted on: one socket
/// (from systemd) is shared by all the workers, and the group of a process with more
/// workers than this one is spread over the fewer (a socket no one accepted on would hold
/// its share of the connections). The returned task ends once every loop has ended (and
/// closed its duplicate).
fn accept_on_workers(
    group: Vec<std::net::TcpListener>,
    ctx: &Arc<Context>,
    stop: &CancellationToken,
) -> io::Result<JoinHandle<()>> {
    let handles = ctx.workers.handles();
    let n = handles.len().max(group.len());
    let mut loops = Vec::with_capacity(n);
    for i in 0..n {
        let (handle, listener) = (&handles[i % handles.len()], &group[i % group.len()]);
        listener.set_nonblocking(true)?;
        let dup = listener.try_clone()?;
        // A child of the listener's signal per worker: the workers wait on it without
        // sharing a lock.
        let (ctx, stop) = (Arc::clone(ctx), stop.child_token());
        loops.push(handle.spawn(async move {
            match tokio::net::TcpListener::from_std(dup) {
                Ok(l) => connection::accept_loop(l, ctx, stop).await,
                Err(e) => tracing::error!(error = %e, "cannot accept on a worker"),
            }
        }));
    }
    drop(group);
    Ok(tokio::spawn(async move {
        for l in loops {
            let _ = l.await;
        }
    }))
}

/// Keeps, replaces or stops a single listener (admin, redirect).
fn commit_single(
    old: Option<Bound>,
    want: Option<(SocketAddr, Option<std::net::TcpListener>)>,
    role: Role,
    ctx: &Arc<Context>,
    admin: &dyn Fn(tokio::net::TcpListener, CancellationToken) -> JoinHandle<()>,
) -> io::Result<Option<Bound>> {
    match want {
        Some((_, None)) => Ok(old),
        Some((configured, Some(std_listener))) => {
            if let Some(b) = old {
                b.stop.cancel();
            }
            let fds = vec![std_listener.as_fd().try_clone_to_owned()?];
            let l = tokio::net::TcpListener::from_std(std_listener)?;
            let local = l.local_addr()?;
            let stop = ctx.stop.child_token();
            let task = match role {
                Role::Admin => {
                    tracing::info!(listen = %local, "admin listener up");
                    admin(l, stop.clone())
                }
                Role::Client | Role::Redirect => {
                    tracing::info!(listen = %local, "redirecting plain HTTP to https");
                    tokio::spawn(connection::redirect_loop(l, Arc::clone(ctx), stop.clone()))
                }
            };
            Ok(Some(Bound {
                configured,
                local,
                role,
                fds,
                stop,
                task,
            }))
        }
        None => {
            if let Some(b) = old {
                tracing::info!(listen = %b.local, "listener off (removed from the config)");
                b.stop.cancel();
            }
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn a_group_is_one_port_that_spreads_its_connections() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let expected = if cfg!(target_os = "linux") { 2 } else { 1 };
        assert_eq!(group.len(), expected);
        let port = group[0].local_addr().unwrap();
        assert_ne!(port.port(), 0);
        assert!(group.iter().all(|l| l.local_addr().unwrap() == port));
        // 64 connections, each queued on one socket: every one is accepted exactly once,
        // and with two sockets each gets some (all on one has a chance of 2 in 2^64).
        let clients: Vec<_> = (0..64)
            .map(|_| std::net::TcpStream::connect(port).unwrap())
            .collect();
        let mut per_socket = vec![0; group.len()];
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while per_socket.iter().sum::<usize>() < clients.len() {
            assert!(
                std::time::Instant::now() < deadline,
                "accepted {per_socket:?}"
            );
            for (l, n) in group.iter().zip(&mut per_socket) {
                match l.accept() {
                    Ok(_) => *n += 1,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::yield_now(),
                    Err(e) => panic!("{e}"),
                }
            }
        }
        assert!(per_socket.iter().all(|&n| n > 0), "{per_socket:?}");
    }

    #[test]
    fn a_group_never_joins_a_listener_already_there() {
        // Another listener with SO_REUSEPORT, as a second fairway's group or any program's.
        let other = unbound("127.0.0.1:0".parse().unwrap()).unwrap();
        other.set_reuse_port(true).unwrap();
        other
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        other.listen(16).unwrap();
        let taken = other.local_addr().unwrap().as_socket().unwrap();
        for n in [1, 2] {
            let e = bind_group(taken, n).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::AddrInUse, "{n} sockets: {e}");
        }
        // And a group is not joined by a second one either.
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let e = bind_group(group[0].local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::AddrInUse);
    }
}
