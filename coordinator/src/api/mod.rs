//! Adapters: the gRPC services for agents and operators and the plain HTTP
//! endpoints. They read who is calling (once, in an interceptor), convert
//! proto to domain and back, and call the domain (`jobs`, `backups`, `repo`,
//! `schedule`, `health`); what a request does is decided there, not here.

pub mod agent;
pub mod enrollment;
pub mod http;
pub mod operator;

use datasaver_common::tls::{identity_from_der, PeerIdentity, Role};
use tonic::{Request, Status};

/// Who is calling: read from the client certificate once per request by the
/// service's interceptor, and handed to the domain from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: PeerIdentity,
}

impl Caller {
    /// The agent or operator name from the certificate.
    pub fn name(&self) -> &str {
        &self.identity.name
    }

    /// The caller the interceptor put on `req`.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.identity.fmt(f)
    }
}

/// The interceptor of a service only `role` may call: it reads the
/// certificate, refuses other roles with one line, and attaches the `Caller`.
pub fn require(role: Role) -> impl Fn(Request<()>) -> Result<Request<()>, Status> + Clone {
    move |mut req: Request<()>| {
        let identity = identity(&req)?;
        if identity.role != role {
            return Err(Status::permission_denied(format!(
                "{identity} may not call this service (it needs a {} certificate)",
                role.as_str()
            )));
        }
        req.extensions_mut().insert(Caller { identity });
        Ok(req)
    }
}

fn identity<T>(req: &Request<T>) -> Result<PeerIdentity, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let first = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    identity_from_der(first.as_ref()).map_err(Status::unauthenticated)
}

/// A failure inside the coordinator, as a gRPC status.
pub fn internal(e: impl std::fmt::Display) -> Status {
    Status::internal(e.to_string())
}
