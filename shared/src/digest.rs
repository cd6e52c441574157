//! Content digests (`sha256:<64 hex>`), validated once at the edge.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a string is not a digest kiln accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DigestError {
    #[error("digest {0:?} has no algorithm: expected \"sha256:<64 hex digits>\"")]
    NoAlgorithm(String),
    #[error("digest {0:?} uses an unsupported algorithm: only sha256 is supported")]
    UnsupportedAlgorithm(String),
    #[error("digest {0:?} is malformed: expected \"sha256:\" and 64 lowercase hex digits")]
    Malformed(String),
}

/// A sha256 digest, always `sha256:` plus 64 lowercase hex digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// The digest of the given 32 bytes of a sha256 sum.
    pub fn from_sha256_bytes(bytes: &[u8; 32]) -> Self {
        let mut hex = String::with_capacity(64);
        for b in bytes {
            hex.push(char::from(HEX[usize::from(b >> 4)]));
            hex.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        Digest { hex }
    }

    /// The 64 hex digits, which name the blob file under `blobs/sha256/`.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The algorithm; always `sha256`.
    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }

    /// The first `n` hex digits, for display.
    pub fn short(&self, n: usize) -> &str {
        &self.hex[..n.min(self.hex.len())]
    }

    /// Builds a digest from 64 lowercase hex digits.
    pub fn from_hex(hex: &str) -> Result<Self, DigestError> {
        if hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            Ok(Digest {
                hex: hex.to_owned(),
            })
        } else {
            Err(DigestError::Malformed(format!("sha256:{hex}")))
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

impl FromStr for Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let Some((alg, hex)) = s.split_once(':') else {
            return Err(DigestError::NoAlgorithm(s.to_owned()));
        };
        if alg != "sha256" {
            // The OCI grammar allows other algorithms; a well-formed one we do not serve is
            // "unsupported", anything else is malformed.
            let well_formed = !alg.is_empty()
                && alg
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"+._-".contains(&b))
                && !hex.is_empty()
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"=_-".contains(&b));
            return Err(if well_formed {
                DigestError::UnsupportedAlgorithm(s.to_owned())
            } else {
                DigestError::Malformed(s.to_owned())
            });
        }
        Digest::from_hex(hex).map_err(|_| DigestError::Malformed(s.to_owned()))
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest(sha256:{})", self.hex)
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E3: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_prints() {
        let d: Digest = E3.parse().unwrap();
        assert_eq!(d.to_string(), E3);
        assert_eq!(d.short(12), "e3b0c44298fc");
        assert_eq!(serde_json::to_string(&d).unwrap(), format!("\"{E3}\""));
    }

    #[test]
    fn rejects_bad_input() {
        assert!(matches!(
            "e3b0".parse::<Digest>(),
            Err(DigestError::NoAlgorithm(_))
        ));
        assert!(matches!(
            "sha512:abcd".parse::<Digest>(),
            Err(DigestError::UnsupportedAlgorithm(_))
        ));
        assert!(matches!(
            "sha256:ABCD".parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
        assert!(matches!(
            "sha256:../../etc".parse::<Digest>(),
            Err(DigestError::Malformed(_))
        ));
        let upper = E3.to_uppercase().replace("SHA256", "sha256");
        assert!(upper.parse::<Digest>().is_err());
    }

    #[test]
    fn from_bytes_matches_hex() {
        let d = Digest::from_sha256_bytes(&[0xab; 32]);
        assert_eq!(d.hex(), "ab".repeat(32));
    }
}
