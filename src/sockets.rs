//! The bound listeners (client and admin), reconciled by diff: on reload, addresses that
//! stay keep their socket, new ones are bound before anything changes (a bind failure
//! fails the reload), and removed ones stop accepting while their connections drain.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Socket, Type};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Addr, Config};
use crate::connection;
use crate::context::Context;

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
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The client listeners and the admin listener.
#[derive(Debug, Default)]
pub struct ListenerSet {
    client: Vec<Bound>,
    admin: Option<Bound>,
    redirect: Option<Bound>,
}

/// Sockets bound for a new config, not yet accepting. Dropping it releases them.
#[derive(Debug)]
pub struct Prepared {
    /// `None`: keep the socket already bound to that address.
    client: Vec<(SocketAddr, Option<std::net::TcpListener>)>,
    admin: Option<(SocketAddr, Option<std::net::TcpListener>)>,
    redirect: Option<(SocketAddr, Option<std::net::TcpListener>)>,
}

/// Which accept loop a single listener runs.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Admin,
    Redirect,
}

/// Binds like Nginx: `SO_REUSEADDR`, a backlog of 1024, non-blocking.
fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

impl ListenerSet {
    /// Binds every address of `cfg` that is not bound yet.
    pub fn prepare(&self, cfg: &Config) -> Result<Prepared, BindError> {
        let mut client = Vec::new();
        for &addr in &cfg.server.listen.0 {
            let kept = self.client.iter().any(|b| b.configured == addr);
            let fresh = if kept {
                None
            } else {
                Some(bind(addr).map_err(|source| BindError {
                    key: "server.listen",
                    addr,
                    source,
                })?)
            };
            client.push((addr, fresh));
        }
        let single = |current: &Option<Bound>, want: Option<Addr>, key: &'static str| {
            let Some(Addr(addr)) = want else {
                return Ok(None);
            };
            if current.as_ref().is_some_and(|b| b.configured == addr) {
                return Ok(Some((addr, None)));
            }
            bind(addr)
                .map(|l| Some((addr, Some(l))))
                .map_err(|source| BindError { key, addr, source })
        };
        let admin = single(&self.admin, cfg.admin.listen, "admin.listen")?;
        let redirect = single(
            &self.redirect,
            cfg.server.redirect_http,
            "server.redirect_http",
        )?;
        Ok(Prepared {
            client,
            admin,
            redirect,
        })
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
                    let l = tokio::net::TcpListener::from_std(std_listener)?;
                    let local = l.local_addr()?;
                    let stop = ctx.stop.child_token();
                    let task =
                        tokio::spawn(connection::accept_loop(l, Arc::clone(ctx), stop.clone()));
                    tracing::info!(listen = %local, "accepting client connections");
                    self.client.push(Bound {
                        configured,
                        local,
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
        self.admin = commit_single(self.admin.take(), prepared.admin, Kind::Admin, ctx, admin)?;
        self.redirect = commit_single(
            self.redirect.take(),
            prepared.redirect,
            Kind::Redirect,
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

/// Keeps, replaces or stops a single listener (admin, redirect).
fn commit_single(
    old: Option<Bound>,
    want: Option<(SocketAddr, Option<std::net::TcpListener>)>,
    kind: Kind,
    ctx: &Arc<Context>,
    admin: &dyn Fn(tokio::net::TcpListener, CancellationToken) -> JoinHandle<()>,
) -> io::Result<Option<Bound>> {
    match want {
        Some((_, None)) => Ok(old),
        Some((configured, Some(std_listener))) => {
            if let Some(b) = old {
                b.stop.cancel();
            }
            let l = tokio::net::TcpListener::from_std(std_listener)?;
            let local = l.local_addr()?;
            let stop = ctx.stop.child_token();
            let task = match kind {
                Kind::Admin => {
                    tracing::info!(listen = %local, "admin listener up");
                    admin(l, stop.clone())
                }
                Kind::Redirect => {
                    tracing::info!(listen = %local, "redirecting plain HTTP to https");
                    tokio::spawn(connection::redirect_loop(l, Arc::clone(ctx), stop.clone()))
                }
            };
            Ok(Some(Bound {
                configured,
                local,
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
