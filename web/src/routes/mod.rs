//! HTTP routes, one module per area; each owns its `router()`.

pub mod admin;
pub mod api;
pub mod assets;
pub mod feedback;
pub mod health;
pub mod pwa;

use std::net::IpAddr;

use poem::Request;

/// The client's address as seen by this process (the peer; proxy headers are not trusted).
pub fn client_ip(req: &Request) -> IpAddr {
    req.remote_addr().as_socket_addr().map(|addr| addr.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]))
}
