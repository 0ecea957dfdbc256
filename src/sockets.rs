//! The bound listeners (client and admin), reconciled by diff: on reload, addresses that
//! stay keep their socket, new ones are bound before anything changes (a bind failure
//! fails the reload), and removed ones stop accepting while their connections drain. A
//! socket handed over at start (`inherit`) is used instead of binding its address; every
//! socket can be handed over to a new process ([`ListenerSet::handover`]).

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
    /// The listening socket itself (a duplicate of the accept loop's), to hand over.
    fd: OwnedFd,
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
    /// `None`: keep the socket already bound to that address.
    client: Vec<(SocketAddr, Option<std::net::TcpListener>)>,
    admin: Option<(SocketAddr, Option<std::net::TcpListener>)>,
    redirect: Option<(SocketAddr, Option<std::net::TcpListener>)>,
}

/// Binds like Nginx: `SO_REUSEADDR`, IPv6 sockets IPv6 only, a backlog of 1024,
/// non-blocking.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        // `[::]:80` beside `0.0.0.0:80`, as Nginx's `ipv6only=on`.
        socket.set_only_v6(true)?;
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
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
                Some(
                    self.obtain(addr, Role::Client)
                        .map_err(|source| BindError {
                            key: "server.listen",
                            addr,
                            source,
                        })?,
                )
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
            .map(|b| Ok((b.role, b.fd.try_clone()?)))
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
                Some(std_listener) => {
                    let fd = std_listener.as_fd().try_clone_to_owned()?;
                    let local = std_listener.local_addr()?;
                    let stop = ctx.stop.child_token();
                    let task = accept_on_workers(std_listener, ctx, &stop)?;
                    tracing::info!(listen = %local, "accepting client connections");
                    self.client.push(Bound {
                        configured,
                        local,
                        role: Role::Client,
                        fd,
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

/// Starts an accept loop on every worker, each on a duplicate of `listener`; the returned
/// task ends once every loop has ended (and closed its duplicate).
fn accept_on_workers(
    listener: std::net::TcpListener,
    ctx: &Arc<Context>,
    stop: &CancellationToken,
) -> io::Result<JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let mut loops = Vec::with_capacity(ctx.workers.len());
    for handle in ctx.workers.handles() {
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
    drop(listener);
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
            let fd = std_listener.as_fd().try_clone_to_owned()?;
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
                fd,
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
