//! HTTP routes, one module per area; each owns its `router()`.

pub mod admin;
pub mod api;
pub mod assets;
pub mod feedback;
pub mod health;
pub mod pwa;

use std::net::IpAddr;

use poem::Request;

/// The client's address: the peer's, unless the peer is a configured trusted proxy, in
/// which case the nearest address in `X-Forwarded-For` that is not a trusted proxy.
/// Headers from anyone else are ignored, so clients cannot pick their own address.
pub fn client_ip(req: &Request, trusted_proxies: &[IpAddr]) -> IpAddr {
    let peer = req.remote_addr().as_socket_addr().map(|addr| addr.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
    if !trusted_proxies.contains(&peer) {
        return peer;
    }
    let forwarded: Vec<IpAddr> = req
        .headers()
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|hop| hop.trim().parse::<IpAddr>().ok())
        .collect();
    forwarded.into_iter().rev().find(|ip| !trusted_proxies.contains(ip)).unwrap_or(peer)
}
