//! Word processing as BuildKit's `shell.Lex` does it: quote removal and variable
//! expansion (`$VAR`, `${VAR}`, `${VAR:-word}`, `${VAR-word}`, `${VAR:+word}`,
//! `${VAR+word}`, `${VAR:?message}`, `${VAR?message}`), with the Dockerfile's escape
//! character. No command substitution, no globbing: a Dockerfile word is never run by a
//! shell here.

/// Looks a variable up; `None` when it is not set (distinct from set to "").
pub trait Vars {
    fn get(&self, name: &str) -> Option<&str>;
}

impl Vars for [(String, String)] {
    fn get(&self, name: &str) -> Option<&str> {
        // Later entries win, as a later ENV or ARG overrides an earlier one.
        self.iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

impl Vars for Vec<(String, String)> {
    fn get(&self, name: &str) -> Option<&str> {
        Vars::get(self.as_slice(), name)
    }
}

/// Why a word cannot be expanded (BuildKit's shell lexer's messages).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("missing '{0}' in substitution")]
    Unclosed(char),
    #[error("unexpected end of statement while looking for matching {0}-quote")]
    Unquoted(&'static str),
    #[error("bad substitution: a variable name is expected after '${{'")]
    NoName,
    /// `${NAME:?message}` or `${NAME?message}` on an unset (or empty) variable.
    #[error("{name}: {}", or_default_message(message))]
    Required { name: String, message: String },
    #[error("unsupported modifier (:{0}) in substitution")]
    ColonModifier(char),
    #[error(
        "unsupported modifier ({modifier}) in substitution of ${{{name}}}: the native builder supports :-, -, :+, +, :? and ?"
    )]
    Modifier { modifier: char, name: String },
}

/// Expands one word: removes quotes and escapes, substitutes variables.
pub fn expand(word: &str, escape: char, vars: &dyn Vars) -> Result<String, ExpandError> {
    let chars: Vec<char> = word.chars().collect();
    let mut lx = Lexer {
        chars: &chars,
        pos: 0,
        escape,
        vars,
    };
    lx.process(None)
}

struct Lexer<'a> {
    chars: &'a [char],
    pos: usize,
    escape: char,
    vars: &'a dyn Vars,
}

impl Lexer<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        Some(c)
    }

    /// Processes until the end, or until `stop` (unescaped, unquoted) which is consumed.
    fn process(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            let Some(c) = self.next() else {
                if let Some(stop) = stop {
                    return Err(ExpandError::Unclosed(stop));
                }
                return Ok(out);
            };
            if Some(c) == stop {
                return Ok(out);
            }
            match c {
                '\'' => out.push_str(&self.single_quoted()?),
                '"' => out.push_str(&self.double_quoted()?),
                '$' => out.push_str(&self.dollar()?),
                c if c == self.escape => {
                    // An escape at the very end is dropped, as BuildKit does.
                    if let Some(n) = self.next() {
                        out.push(n);
                    }
                }
                c => out.push(c),
            }
        }
    }

    fn single_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(ExpandError::Unquoted("single"));
                }
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => {
                    return Err(ExpandError::Unquoted("double"));
                }
                Some('"') => return Ok(out),
                Some('$') => out.push_str(&self.dollar()?),
                Some(c) if c == self.escape => match self.peek() {
                    Some(n) if n == '"' || n == '$' || n == self.escape => {
                        self.pos += 1;
                        out.push(n);
                    }
                    _ => out.push(c),
                },
                Some(c) => out.push(c),
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        while let Some(c) = self.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                self.pos += 1;
            } else {
                break;
            }
        }
        name
    }

    fn dollar(&mut self) -> Result<String, ExpandError> {
        match self.peek() {
            Some('{') => {
                self.pos += 1;
                let name = self.name();
                if name.is_empty() {
                    return Err(ExpandError::NoName);
                }
                let value = self.vars.get(&name).map(str::to_owned);
                match self.next() {
                    Some('}') => Ok(value.unwrap_or_default()),
                    Some(':') => {
                        let op = self.next();
                        let word = self.process(Some('}'))?;
                        let set_nonempty = value.as_deref().is_some_and(|v| !v.is_empty());
                        match op {
                            Some('-') => Ok(if set_nonempty {
                                value.unwrap_or_default()
                            } else {
                                word
                            }),
                            Some('+') => Ok(if set_nonempty { word } else { String::new() }),
                            Some('?') => {
                                if set_nonempty {
                                    Ok(value.unwrap_or_default())
                                } else {
                                    Err(ExpandError::Required {
                                        name,
                                        message: word,
                                    })
                                }
                            }
                            Some(c) => Err(ExpandError::ColonModifier(c)),
                            None => Err(ExpandError::Unclosed('}')),
                        }
                    }
                    Some(op @ ('-' | '+' | '?')) => {
                        let word = self.process(Some('}'))?;
                        match op {
                            '-' => Ok(value.unwrap_or(word)),
                            '+' => Ok(if value.is_some() { word } else { String::new() }),
                            _ => value.ok_or(ExpandError::Required {
                                name,
                                message: word,
                            }),
                        }
                    }
                    Some(modifier) => Err(ExpandError::Modifier { modifier, name }),
                    None => Err(ExpandError::Unclosed('}')),
                }
            }
            Some(c) if c.is_ascii_alphanumeric() || c == '_' => {
                let name = self.name();
                Ok(self.vars.get(&name).unwrap_or_default().to_owned())
            }
            _ => Ok("$".into()),
        }
    }
}

fn or_default_message(word: &str) -> &str {
    if word.is_empty() {
        "is not allowed to be unset"
    } else {
        word
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vec<(String, String)> {
        vec![
            ("A".into(), "alpha".into()),
            ("EMPTY".into(), String::new()),
            ("B".into(), "one".into()),
            ("B".into(), "two".into()),
        ]
    }

    fn x(word: &str) -> Result<String, ExpandError> {
        expand(word, '\\', &vars())
    }

    #[test]
    fn substitutes_plain_and_braced_variables() {
        assert_eq!(x("$A/${A}x$B").unwrap(), "alpha/alphaxtwo");
        assert_eq!(x("$UNSET-${UNSET}.").unwrap(), "-.");
        assert_eq!(x("cost $ 5 $").unwrap(), "cost $ 5 $");
    }

    #[test]
    fn applies_modifiers() {
        assert_eq!(x("${UNSET:-d}${EMPTY:-e}${A:-f}").unwrap(), "dealpha");
        assert_eq!(x("${UNSET-d}[${EMPTY-e}]").unwrap(), "d[]");
        assert_eq!(x("${UNSET:+p}[${EMPTY:+q}]${A:+r}").unwrap(), "[]r");
        assert_eq!(x("${EMPTY+s}${UNSET+t}").unwrap(), "s");
        assert_eq!(x("${A:-$B}${UNSET:-${B}x}").unwrap(), "alphatwox");
        assert_eq!(
            x("${UNSET:?need it}").unwrap_err().to_string(),
            "UNSET: need it"
        );
        assert_eq!(
            x("${EMPTY:?}").unwrap_err().to_string(),
            "EMPTY: is not allowed to be unset"
        );
        assert_eq!(x("${EMPTY?}").unwrap(), "");
        assert!(
            x("${A#x}")
                .unwrap_err()
                .to_string()
                .contains("unsupported modifier (#)")
        );
        assert!(x("${A").unwrap_err().to_string().contains("missing '}'"));
        assert!(
            x("${}")
                .unwrap_err()
                .to_string()
                .contains("bad substitution")
        );
    }

    #[test]
    fn removes_quotes_and_escapes() {
        assert_eq!(x(r#""a b $A" 'c $A'"#).unwrap(), "a b alpha c $A");
        assert_eq!(x(r"\$A \\ \x").unwrap(), r"$A \ x");
        assert_eq!(x(r#""q\"q \n""#).unwrap(), r#"q"q \n"#);
        assert!(x("'open").unwrap_err().to_string().contains("single-quote"));
        assert!(
            x("\"open")
                .unwrap_err()
                .to_string()
                .contains("double-quote")
        );
        assert_eq!(expand("`$A C:\\x", '`', &vars()).unwrap(), "$A C:\\x");
    }
}
