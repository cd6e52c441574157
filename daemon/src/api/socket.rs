//! Creating the API socket: a private directory, a stale socket replaced, a live one
//! refused, the socket itself mode 0600.

use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use tokio::net::{UnixListener, UnixStream};

use super::ApiError;

pub(super) async fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|error| ApiError::CreateDir {
                path: dir.to_owned(),
                error,
            })?;
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).await.is_ok() {
                return Err(ApiError::InUse {
                    path: path.to_owned(),
                });
            }
            tracing::info!(path = %path.display(), "removing a stale kilnd socket");
            std::fs::remove_file(path).map_err(|error| ApiError::RemoveStale {
                path: path.to_owned(),
                error,
            })?;
        }
        Ok(_) => {
            return Err(ApiError::NotASocket {
                path: path.to_owned(),
            });
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|error| ApiError::Bind {
        path: path.to_owned(),
        error,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|error| {
        ApiError::Permissions {
            path: path.to_owned(),
            error,
        }
    })?;
    Ok(listener)
}
