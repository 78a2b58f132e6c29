//! Placeholder until the embedded-Tor module lands: every call reports that
//! Tor support is not built in yet.
use std::net::SocketAddr;
use std::time::Duration;

pub type Tor = std::sync::Arc<()>;

#[derive(Debug)]
pub struct TorError(String);
impl std::fmt::Display for TorError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn parse_onion_target(_addr: &str) -> Result<(String, u16), TorError> {
    Err(TorError("Tor support is not built in yet".into()))
}
pub async fn connect(_tor: &Tor, _h: &str, _p: u16, _t: Duration) -> Result<tokio::net::TcpStream, TorError> {
    Err(TorError("Tor support is not built in yet".into()))
}
pub async fn socks5_connect(_p: SocketAddr, _h: &str, _port: u16, _t: Duration) -> Result<tokio::net::TcpStream, TorError> {
    Err(TorError("Tor support is not built in yet".into()))
}
