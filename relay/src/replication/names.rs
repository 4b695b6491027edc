//! Names in replication commands and SQL: which slot and publication names
//! Postgres takes as given (so none is rejected or silently truncated), and
//! quoting for identifiers and literals.

use super::error::ReplicationError;

/// Postgres accepts slot names of lower-case letters, digits and `_`, up to 63 bytes.
pub(crate) fn validate_slot_name(name: &str) -> Result<(), ReplicationError> {
    let invalid = |reason| ReplicationError::InvalidName {
        kind: "replication slot",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid("must be 1 to 63 bytes long"));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(
            "may contain only lower-case letters, digits and underscores",
        ));
    }
    Ok(())
}

/// Publication names are identifiers: non-empty, at most 63 bytes (longer
/// ones would be truncated silently), no NUL.
pub(crate) fn validate_publication_name(name: &str) -> Result<(), ReplicationError> {
    let invalid = |reason| ReplicationError::InvalidName {
        kind: "publication",
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() || name.len() > 63 {
        return Err(invalid("must be 1 to 63 bytes long"));
    }
    if name.contains('\0') {
        return Err(invalid("may not contain NUL"));
    }
    Ok(())
}

/// `"name"` with inner quotes doubled: an identifier in SQL and in
/// replication commands.
pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` with inner quotes doubled (standard-conforming strings; the
/// replication command lexer knows no backslash escapes either).
pub(crate) fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_identifiers_and_literals() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal(&quote_ident("it's")), "'\"it''s\"'");
    }

    #[test]
    fn validates_names() {
        assert!(validate_slot_name("outbox_relay_1").is_ok());
        for bad in ["", "Upper", "a-b", "a\"b", &"x".repeat(64)] {
            let err = validate_slot_name(bad).unwrap_err();
            assert!(!err.is_transient());
        }
        assert!(validate_publication_name("Outbox Pub \"1\"").is_ok());
        assert!(validate_publication_name("a\0b").is_err());
    }
}
