//! What the gateway serves to browsers: a chat page (`/`), the dashboard page
//! (`/dashboard`) and the dashboard's live feed (`live`). The pages are compiled into the
//! binary and load nothing from elsewhere.

pub mod live;

pub const CHAT_PAGE: &str = include_str!("chat.html");
pub const DASHBOARD_PAGE: &str = include_str!("dashboard.html");
pub const HTML: &str = "text/html; charset=utf-8";
/// The pages hold their script and style inline and talk only to the gateway.
pub const PAGE_HEADERS: &str = "Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nContent-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:; img-src data:\r\n";

use crate::chat::auth::Authenticator;
use crate::chat::session::credentials;
use crate::config::Config;
use crate::ws::handshake::{Rejection, Request};

/// May `request` open the dashboard's live feed? With a token (`?token=` or `Authorization:
/// Bearer`) that carries the admin claim, or with `--dashboard-open`.
pub fn authorize_dashboard(config: &Config, auth: &Authenticator, request: &Request<'_>) -> Result<(), Rejection> {
    if config.dashboard_open {
        return Ok(());
    }
    match credentials(request).0.map(|token| auth.verify(&token)) {
        Some(Ok(identity)) if identity.admin => Ok(()),
        Some(Ok(_)) => Err(Rejection {
            status: 403,
            message: "the dashboard needs a token with the admin claim (shardgate token --admin)",
            extra_headers: "",
        }),
        Some(Err(_)) => Err(Rejection {
            status: 401,
            message: "the token is malformed, badly signed or expired",
            extra_headers: "WWW-Authenticate: Bearer\r\n",
        }),
        None => Err(Rejection {
            status: 401,
            message: "an admin token is required: ?token= (or run with --dashboard-open for a local demo)",
            extra_headers: "WWW-Authenticate: Bearer\r\n",
        }),
    }
}
