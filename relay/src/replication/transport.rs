//! The transport under a replication connection: a TCP or Unix socket,
//! then, as `sslmode` says, the SSLRequest and the TLS handshake (rustls,
//! configured by `pgconn` like every other Postgres connection).

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::codec::BoxedIo;
use super::error::ReplicationError;
use pgconn::{ConnectParams, SslMode};

pub(super) async fn open_socket(params: &ConnectParams) -> Result<BoxedIo, ReplicationError> {
    let connect_err = |source| ReplicationError::Connect {
        addr: params.addr(),
        source,
    };
    if params.is_unix_socket() {
        #[cfg(unix)]
        {
            let socket = tokio::net::UnixStream::connect(params.socket_path())
                .await
                .map_err(connect_err)?;
            return Ok(Box::new(socket));
        }
        #[cfg(not(unix))]
        return Err(ReplicationError::Config(
            "Unix sockets are not supported on this platform".into(),
        ));
    }
    let socket = TcpStream::connect((params.host.as_str(), params.port))
        .await
        .map_err(connect_err)?;
    socket.set_nodelay(true).map_err(connect_err)?;
    Ok(Box::new(socket))
}

/// Opens the socket and asks for TLS. Returns the stream and whether it is
/// encrypted (`prefer` continues in plain text when the server says no).
pub(super) async fn open_tls(params: &ConnectParams) -> Result<(BoxedIo, bool), ReplicationError> {
    if params.is_unix_socket() {
        if params.ssl_mode == SslMode::Prefer {
            return Ok((open_socket(params).await?, false));
        }
        return Err(ReplicationError::Config(format!(
            "sslmode={} needs TCP; TLS is not available over a Unix socket",
            params.ssl_mode
        )));
    }
    let (connector, name) = pgconn::connector(params)?;
    let addr = params.addr();
    let mut socket = TcpStream::connect((params.host.as_str(), params.port))
        .await
        .map_err(|source| ReplicationError::Connect {
            addr: addr.clone(),
            source,
        })?;
    let _ = socket.set_nodelay(true);
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    socket
        .write_all(&request)
        .await
        .map_err(ReplicationError::Io)?;
    // Exactly one byte: anything the server sent after it (it must not)
    // stays unread rather than being mistaken for TLS-protected data.
    match socket.read_u8().await.map_err(ReplicationError::from_io)? {
        b'S' => {
            let stream = connector
                .connect(name, socket)
                .await
                .map_err(|source| ReplicationError::Tls { addr, source })?;
            Ok((Box::new(stream), true))
        }
        b'N' if params.ssl_mode == SslMode::Prefer => Ok((Box::new(socket), false)),
        b'N' => Err(ReplicationError::TlsRefused {
            addr,
            mode: params.ssl_mode,
        }),
        other => Err(ReplicationError::Protocol(format!(
            "unexpected answer {other:#04x} to SSLRequest"
        ))),
    }
}
