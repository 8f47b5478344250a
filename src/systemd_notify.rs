//! The systemd notification protocol (`Type=notify`), without a dependency:
//! one datagram to `$NOTIFY_SOCKET`. Outside systemd it does nothing.

use std::os::unix::net::UnixDatagram;

/// Sends `state` (e.g. `READY=1`) if keygate runs under systemd with `Type=notify`.
pub fn notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let sent = UnixDatagram::unbound().and_then(|socket| {
        // A leading '@' names a socket in Linux's abstract namespace.
        match path.as_encoded_bytes().strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
                socket.send_to_addr(state.as_bytes(), &address)
            }
            None => socket.send_to(state.as_bytes(), &path),
        }
    });
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot notify systemd");
    }
}

/// Ready to serve. `MAINPID` lets a process started by `serve --upgrade` take over
/// as the unit's main process (with `NotifyAccess=all`).
pub fn ready() {
    notify(&format!("READY=1\nMAINPID={}", std::process::id()));
}

pub fn stopping() {
    notify("STOPPING=1");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_reaches_the_notify_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        // The variable is read per call; this test is the only one that sets it.
        std::env::set_var("NOTIFY_SOCKET", &path);
        ready();
        std::env::remove_var("NOTIFY_SOCKET");
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).unwrap();
        let message = std::str::from_utf8(&buf[..n]).unwrap();
        assert_eq!(message, format!("READY=1\nMAINPID={}", std::process::id()));
    }
}
