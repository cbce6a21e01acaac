//! Splitting one CSV line into fields (RFC 4180 quoting; a quoted field may not span lines).

/// Splits `line` into fields, or says why it cannot.
pub fn split(line: &str) -> Result<Vec<String>, &'static str> {
    let mut fields = Vec::new();
    let mut field = String::new();
    let mut chars = line.chars().peekable();
    let mut quoted = false;
    let mut at_start = true;
    while let Some(c) = chars.next() {
        if quoted {
            match c {
                '"' if chars.peek() == Some(&'"') => {
                    chars.next();
                    field.push('"');
                }
                '"' => {
                    quoted = false;
                    match chars.peek() {
                        None | Some(',') => {}
                        Some(_) => return Err("text after a closing quote"),
                    }
                }
                c => field.push(c),
            }
            continue;
        }
        match c {
            ',' => {
                fields.push(std::mem::take(&mut field));
                at_start = true;
                continue;
            }
            '"' if at_start => quoted = true,
            '"' => return Err("quote inside an unquoted field"),
            c => field.push(c),
        }
        at_start = false;
    }
    if quoted {
        return Err("unterminated quoted field");
    }
    fields.push(field);
    Ok(fields)
}

#[cfg(test)]
mod tests {
    use super::split;

    #[test]
    fn fields() {
        assert_eq!(split("a,b,,c").expect("ok"), ["a", "b", "", "c"]);
        assert_eq!(
            split(r#""x, y","say ""hi""",z"#).expect("ok"),
            ["x, y", r#"say "hi""#, "z"]
        );
        assert!(split(r#""open"#).is_err());
        assert!(split(r#"a"b"#).is_err());
    }
}
