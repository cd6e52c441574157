//! Reads a `build.yml` into a [`BuildSpec`], strictly: an unknown key, a wrong type, a
//! missing `image` or a bad value is an error naming the file, line and column.

use std::path::{Path, PathBuf};

use kiln_shared::spec::BuildSpec;

/// A `build.yml` that kiln cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {message}", file.display())]
pub struct SpecError {
    pub file: PathBuf,
    /// 1-based; 0 when the YAML reader gave no position.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Parses the text of `file` (used for messages only).
pub fn parse_build_yml(file: &Path, text: &str) -> Result<BuildSpec, SpecError> {
    if text.trim().is_empty() {
        return Err(SpecError {
            file: file.to_owned(),
            line: 1,
            column: 1,
            message: "the file is empty: expected a mapping with at least `image: NAME`".into(),
        });
    }
    serde_norway::from_str::<BuildSpec>(text).map_err(|e| {
        let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
        let mut message = e.to_string();
        // serde_norway appends " at line L column C"; the prefix already says where.
        if let Some(i) = message.rfind(" at line ") {
            if message[i..].contains(" column ") {
                message.truncate(i);
            }
        }
        SpecError {
            file: file.to_owned(),
            line,
            column,
            message,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_build_yml(Path::new("p/build.yml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn probe() {
        for t in [
            "image: a\nfoo: 1\n",
            "org: x\n",
            "image: a\nnetwork: yes\n",
            "image: a\narches: [amd64, x86]\n",
            "image: a\ndepends:\n  docker-images:\n    target: a\n    target-dir: b\n",
            "image: a\nconfig: 3\n",
            "image: a\ntag: '{{.X}}'\n",
            "image: a\nimage: b\n",
            "image: [a]\n",
            "image: a\n  b: c\n",
            "- a\n",
        ] {
            eprintln!("{t:?} => {}", err(t));
        }
    }
}
