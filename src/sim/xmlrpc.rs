//! The simulated host's own XML-RPC codec, written from the XML-RPC specification
//! (<http://xmlrpc.com/spec.md>) and xapi's conventions, sharing nothing with the client's:
//! * `methodCall` (`methodName`, `params`/`param`/`value`) in, `methodResponse` out;
//! * values: `struct` (`member`: `name`, `value`), `array` (`data`), `string`, `int`/`i4`
//!   (and `i8`), `boolean` (`0`/`1`), `double`, `dateTime.iso8601`, `base64` (kept as text),
//!   `nil`; a `<value>` without a type is a string (xapi sends strings that way, and 64-bit
//!   integers as such strings too).
//!
//! Values are `serde_json::Value`s, the form the simulated host's API works in. Parsing is
//! bounded: at most [`MAX_INPUT`] bytes and [`MAX_DEPTH`] nested values; only the five
//! predefined entities and character references are known (no DOCTYPE, so no entity
//! expansion).

use serde_json::{Map, Number, Value};

/// The largest document decoded.
pub const MAX_INPUT: usize = 64 << 20;
/// The deepest nesting of values.
pub const MAX_DEPTH: usize = 64;

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Open(String),
    Close(String),
    Empty(String),
    Text(String),
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

/// Decode the entities of character data. NUL is no XML character, raw or referenced.
fn unescape(s: &str) -> Result<String, String> {
    if s.contains('\0') {
        return Err("a NUL character in the text".into());
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('&') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let end = after
            .find(';')
            .filter(|&e| e <= 12)
            .ok_or_else(|| "an '&' that starts no entity".to_string())?;
        let name = &after[..end];
        let c = match name {
            "lt" => '<',
            "gt" => '>',
            "amp" => '&',
            "quot" => '"',
            "apos" => '\'',
            _ => {
                let code = if let Some(h) = name.strip_prefix("#x") {
                    u32::from_str_radix(h, 16).ok()
                } else if let Some(d) = name.strip_prefix('#') {
                    d.parse::<u32>().ok()
                } else {
                    None
                };
                code.and_then(char::from_u32)
                    .filter(|&c| c != '\0')
                    .ok_or_else(|| format!("unknown entity &{name};"))?
            }
        };
        out.push(c);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A lexer over a document: tags and text, one at a time (comments, processing instructions and
/// the XML declaration dropped), so memory stays that of the value being built.
struct Parser<'a> {
    rest: &'a str,
    peeked: Option<Tok>,
}

impl<'a> Parser<'a> {
    fn new(xml: &'a str) -> Result<Parser<'a>, String> {
        if xml.len() > MAX_INPUT {
            return Err(format!("document larger than {MAX_INPUT} bytes"));
        }
        Ok(Parser {
            rest: xml,
            peeked: None,
        })
    }

    /// The next token from the text, None at its end.
    fn lex(&mut self) -> Result<Option<Tok>, String> {
        loop {
            let rest = self.rest;
            if rest.is_empty() {
                return Ok(None);
            }
            let Some(lt) = rest.find('<') else {
                self.rest = "";
                return Ok(Some(Tok::Text(unescape(rest)?)));
            };
            if lt > 0 {
                self.rest = &rest[lt..];
                return Ok(Some(Tok::Text(unescape(&rest[..lt])?)));
            }
            if let Some(r) = rest.strip_prefix("<!--") {
                let e = r.find("-->").ok_or("unterminated comment")?;
                self.rest = &r[e + 3..];
                continue;
            }
            if let Some(r) = rest.strip_prefix("<![CDATA[") {
                let e = r.find("]]>").ok_or("unterminated CDATA section")?;
                self.rest = &r[e + 3..];
                if r[..e].contains('\0') {
                    return Err("a NUL character in a CDATA section".into());
                }
                return Ok(Some(Tok::Text(r[..e].to_string())));
            }
            if let Some(r) = rest.strip_prefix("<?") {
                let e = r.find("?>").ok_or("unterminated processing instruction")?;
                self.rest = &r[e + 2..];
                continue;
            }
            if rest.starts_with("<!") {
                return Err("DOCTYPE and other declarations are not accepted".into());
            }
            let gt = rest.find('>').ok_or("unterminated tag")?;
            let inner = &rest[1..gt];
            self.rest = &rest[gt + 1..];
            let (closing, inner) = match inner.strip_prefix('/') {
                Some(i) => (true, i),
                None => (false, inner),
            };
            let (empty, inner) = match inner.strip_suffix('/') {
                Some(i) if !closing => (true, i),
                _ => (false, inner),
            };
            let name_len = inner.bytes().take_while(|&b| is_name_byte(b)).count();
            let (name, attrs) = inner.split_at(name_len);
            if name.is_empty() || (!attrs.is_empty() && !attrs.starts_with([' ', '\t', '\r', '\n']))
            {
                return Err(format!(
                    "malformed tag <{}>",
                    inner.chars().take(40).collect::<String>()
                ));
            }
            if closing && !attrs.trim().is_empty() {
                return Err(format!(
                    "malformed end tag </{}>",
                    inner.chars().take(40).collect::<String>()
                ));
            }
            let name = name.to_string();
            return Ok(Some(if closing {
                Tok::Close(name)
            } else if empty {
                Tok::Empty(name)
            } else {
                Tok::Open(name)
            }));
        }
    }

    fn peek(&mut self) -> Result<Option<&Tok>, String> {
        if self.peeked.is_none() {
            self.peeked = self.lex()?;
        }
        Ok(self.peeked.as_ref())
    }

    fn next(&mut self) -> Result<Tok, String> {
        match self.peeked.take() {
            Some(t) => Ok(t),
            None => self
                .lex()?
                .ok_or_else(|| "the document ends too early".into()),
        }
    }

    /// Skip whitespace-only text.
    fn ws(&mut self) -> Result<(), String> {
        while let Some(Tok::Text(t)) = self.peek()? {
            if !t.trim().is_empty() {
                break;
            }
            self.peeked = None;
        }
        Ok(())
    }

    fn expect_open(&mut self, name: &str) -> Result<(), String> {
        self.ws()?;
        match self.next()? {
            Tok::Open(n) if n == name => Ok(()),
            t => Err(format!("expected <{name}>, found {}", show(&t))),
        }
    }

    fn expect_close(&mut self, name: &str) -> Result<(), String> {
        self.ws()?;
        match self.next()? {
            Tok::Close(n) if n == name => Ok(()),
            t => Err(format!("expected </{name}>, found {}", show(&t))),
        }
    }

    /// The text up to `</name>` (nothing else allowed inside).
    fn text_until(&mut self, name: &str) -> Result<String, String> {
        let mut s = String::new();
        loop {
            match self.next()? {
                Tok::Text(t) => s.push_str(&t),
                Tok::Close(n) if n == name => return Ok(s),
                t => return Err(format!("expected text in <{name}>, found {}", show(&t))),
            }
        }
    }

    /// A value's contents, after its `<value>`, through its `</value>`.
    fn value(&mut self, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("values nested deeper than {MAX_DEPTH}"));
        }
        let mut text = String::new();
        while let Some(Tok::Text(t)) = self.peek()? {
            text.push_str(t);
            self.peeked = None;
        }
        let v = match self.next()? {
            Tok::Close(n) if n == "value" => return Ok(Value::String(text)),
            _ if !text.trim().is_empty() => {
                return Err("text mixed with a typed value".into());
            }
            Tok::Empty(ty) => match ty.as_str() {
                "string" => Value::String(String::new()),
                "nil" => Value::Null,
                "struct" => Value::Object(Map::new()),
                other => return Err(format!("empty <{other}/>")),
            },
            Tok::Open(ty) => self.typed(&ty, depth)?,
            t => return Err(format!("unexpected {} in <value>", show(&t))),
        };
        self.expect_close("value")?;
        Ok(v)
    }

    /// A typed value after its opening tag, through its closing tag.
    fn typed(&mut self, ty: &str, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            "string" | "dateTime.iso8601" => Value::String(self.text_until(ty)?),
            "base64" => Value::String(self.text_until(ty)?.trim().to_string()),
            "int" | "i4" | "i8" => {
                let t = self.text_until(ty)?;
                let n: i64 = t.trim().parse().map_err(|_| {
                    format!("bad <{ty}> {:?}", t.chars().take(40).collect::<String>())
                })?;
                if ty != "i8" && i32::try_from(n).is_err() {
                    return Err(format!("<{ty}> {n} is not a 32-bit integer"));
                }
                Value::from(n)
            }
            "boolean" => match self.text_until(ty)?.trim() {
                "1" => Value::Bool(true),
                "0" => Value::Bool(false),
                t => {
                    return Err(format!(
                        "bad <boolean> {:?}",
                        t.chars().take(40).collect::<String>()
                    ));
                }
            },
            "double" => {
                let t = self.text_until(ty)?;
                t.trim()
                    .parse::<f64>()
                    .ok()
                    .and_then(Number::from_f64)
                    .map(Value::Number)
                    .ok_or_else(|| {
                        format!("bad <double> {:?}", t.chars().take(40).collect::<String>())
                    })?
            }
            "nil" => {
                self.ws()?;
                self.expect_close("nil")?;
                Value::Null
            }
            "array" => {
                self.ws()?;
                let mut items = Vec::new();
                match self.next()? {
                    Tok::Empty(d) if d == "data" => {}
                    Tok::Open(d) if d == "data" => loop {
                        self.ws()?;
                        match self.next()? {
                            Tok::Open(v) if v == "value" => items.push(self.value(depth + 1)?),
                            Tok::Close(d) if d == "data" => break,
                            t => return Err(format!("unexpected {} in <data>", show(&t))),
                        }
                    },
                    t => return Err(format!("expected <data>, found {}", show(&t))),
                }
                self.expect_close("array")?;
                Value::Array(items)
            }
            "struct" => {
                let mut m = Map::new();
                loop {
                    self.ws()?;
                    match self.next()? {
                        Tok::Close(s) if s == "struct" => break,
                        Tok::Open(s) if s == "member" => {
                            self.expect_open("name")?;
                            let name = self.text_until("name")?;
                            self.expect_open("value")?;
                            let v = self.value(depth + 1)?;
                            self.expect_close("member")?;
                            m.insert(name, v);
                        }
                        t => return Err(format!("unexpected {} in <struct>", show(&t))),
                    }
                }
                Value::Object(m)
            }
            other => return Err(format!("unknown XML-RPC type <{other}>")),
        })
    }

    fn end(&mut self) -> Result<(), String> {
        self.ws()?;
        match self.peek()? {
            None => Ok(()),
            Some(t) => Err(format!("{} after the end of the document", show(t))),
        }
    }
}

fn show(t: &Tok) -> String {
    match t {
        Tok::Open(n) => format!("<{n}>"),
        Tok::Close(n) => format!("</{n}>"),
        Tok::Empty(n) => format!("<{n}/>"),
        Tok::Text(t) => format!("text {:?}", t.chars().take(40).collect::<String>()),
    }
}

/// A `methodCall`: (method name, parameters).
pub fn decode_call(xml: &str) -> Result<(String, Vec<Value>), String> {
    let mut p = Parser::new(xml)?;
    p.expect_open("methodCall")?;
    p.expect_open("methodName")?;
    let name = p.text_until("methodName")?.trim().to_string();
    if name.is_empty() {
        return Err("empty <methodName>".into());
    }
    let mut params = Vec::new();
    p.ws()?;
    match p.next()? {
        Tok::Close(n) if n == "methodCall" => return p.end().map(|_| (name, params)),
        Tok::Empty(n) if n == "params" => {}
        Tok::Open(n) if n == "params" => loop {
            p.ws()?;
            match p.next()? {
                Tok::Close(n) if n == "params" => break,
                Tok::Open(n) if n == "param" => {
                    p.expect_open("value")?;
                    params.push(p.value(1)?);
                    p.expect_close("param")?;
                }
                t => return Err(format!("unexpected {} in <params>", show(&t))),
            }
        },
        t => return Err(format!("expected <params>, found {}", show(&t))),
    }
    p.expect_close("methodCall")?;
    p.end()?;
    Ok((name, params))
}

/// One `<value>…</value>` document (xapi's `ova.xml`, a task's result).
pub fn decode_value(xml: &str) -> Result<Value, String> {
    let mut p = Parser::new(xml)?;
    p.expect_open("value")?;
    let v = p.value(1)?;
    p.end()?;
    Ok(v)
}

/// Escape character data.
fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '&' => out.push_str("&amp;"),
            '"' => out.push_str("&quot;"),
            // XML cannot carry NUL at all, not even as a reference.
            '\0' => out.push('\u{fffd}'),
            // Other control characters become references (a decoder maps them back).
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                out.push_str(&format!("&#{};", c as u32))
            }
            c => out.push(c),
        }
    }
}

fn encode_into(v: &Value, out: &mut String) {
    out.push_str("<value>");
    match v {
        // xapi's style: strings untyped, and so are 64-bit integers (as their decimal text).
        Value::String(s) => escape(s, out),
        Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
        Value::Number(n) => {
            out.push_str("<double>");
            out.push_str(&n.to_string());
            out.push_str("</double>");
        }
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        Value::Null => out.push_str("<nil/>"),
        Value::Array(items) => {
            out.push_str("<array><data>");
            for x in items {
                encode_into(x, out);
            }
            out.push_str("</data></array>");
        }
        Value::Object(m) => {
            out.push_str("<struct>");
            for (k, x) in m {
                out.push_str("<member><name>");
                escape(k, out);
                out.push_str("</name>");
                encode_into(x, out);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

/// One value as `<value>…</value>`.
pub fn encode_value(v: &Value) -> String {
    let mut out = String::new();
    encode_into(v, &mut out);
    out
}

/// A `methodResponse` carrying `v` (xapi's replies are `{Status, Value|ErrorDescription}`
/// structs, never faults).
pub fn encode_response(v: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse><params><param>");
    encode_into(v, &mut out);
    out.push_str("</param></params></methodResponse>");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn calls_decode_with_every_type() {
        let xml = "<?xml version='1.0'?>\n<!-- a call -->\n<methodCall><methodName>VDI.get_record</methodName>\n<params>\
            <param><value><string>Opaque&lt;Ref&gt; &amp;&#65;&#x42;</string></value></param>\
            <param><value>untyped  text </value></param>\
            <param><value><int>-7</int></value></param><param><value><i4> 8 </i4></value></param>\
            <param><value><i8>9000000000</i8></value></param>\
            <param><value><boolean>1</boolean></value></param><param><value><double>1.5</double></value></param>\
            <param><value><dateTime.iso8601>20261123T10:00:00Z</dateTime.iso8601></value></param>\
            <param><value><base64> AAEC </base64></value></param>\
            <param><value><struct><member><name>a</name><value><array><data><value>x</value><value><nil/></value></data></array></value></member>\
              <member>\n<name>b</name>\n<value><struct></struct></value></member></struct></value></param>\
            <param><value></value></param><param><value><string/></value></param><param><value><array><data/></array></value></param>\
            <param><value><![CDATA[<raw>]]></value></param>\
            </params></methodCall>\n";
        let (m, p) = decode_call(xml).unwrap();
        assert_eq!(m, "VDI.get_record");
        assert_eq!(
            Value::Array(p),
            json!([
                "Opaque<Ref> &AB", "untyped  text ", -7, 8, 9000000000i64, true, 1.5,
                "20261123T10:00:00Z", "AAEC", {"a": ["x", null], "b": {}}, "", "", [], "<raw>"
            ])
        );
        let (m, p) = decode_call("<methodCall><methodName>x</methodName></methodCall>").unwrap();
        assert_eq!((m.as_str(), p.len()), ("x", 0));
        let (_, p) =
            decode_call("<methodCall><methodName>x</methodName><params/></methodCall>").unwrap();
        assert!(p.is_empty());
    }

    #[test]
    fn responses_round_trip() {
        let v = json!({"Status": "Success", "Value": [{"port": 10809, "cert": "-----BEGIN\n<&>\u{1}", "ok": false,
            "x": 0.25, "none": null, "list": [], "map": {}}]});
        let xml = encode_response(&v);
        assert!(xml.contains("<value>10809</value>"), "{xml}");
        let inner = xml
            .strip_prefix("<?xml version=\"1.0\"?><methodResponse><params><param>")
            .and_then(|x| x.strip_suffix("</param></params></methodResponse>"))
            .unwrap();
        let back = decode_value(inner).unwrap();
        // Integers travel untyped (as xapi's do) and come back as their text.
        let mut want = v.clone();
        want["Value"][0]["port"] = json!("10809");
        assert_eq!(back, want);
        assert_eq!(
            encode_value(&json!(["OpaqueRef:1"])),
            "<value><array><data><value>OpaqueRef:1</value></data></array></value>"
        );
    }

    #[test]
    fn hostile_documents_are_refused() {
        let deep = format!(
            "<value>{}x{}</value>",
            "<array><data><value>".repeat(MAX_DEPTH + 1),
            "</value></data></array>".repeat(MAX_DEPTH + 1)
        );
        assert!(decode_value(&deep).unwrap_err().contains("deeper"));
        let ok_depth = format!(
            "<value>{}x{}</value>",
            "<array><data><value>".repeat(MAX_DEPTH - 2),
            "</value></data></array>".repeat(MAX_DEPTH - 2)
        );
        decode_value(&ok_depth).unwrap();
        for bad in [
            "",
            "<value>",
            "<value><int>x</int></value>",
            "<value><int>3000000000</int></value>",
            "<value><boolean>2</boolean></value>",
            "<value><double>nan</double></value>",
            "<value><float>1</float></value>",
            "<value>a<int>1</int></value>",
            "<value>&bogus;</value>",
            "<value>&#0;</value>",
            "<value>&</value>",
            "<value><struct><member><value>1</value></member></struct></value>",
            "<value><array><value>1</value></array></value>",
            "<value>1</value><value>2</value>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><value>&a;</value>",
            "<value><!-- never ends </value>",
            "<value x</value>",
            "<value><string>a</value>",
            "<value><int/></value>",
            // Found by fuzzing: a raw NUL was accepted, and its re-encoding refused.
            "<value>a\u{0}b</value>",
            "<value><![CDATA[\u{0}]]></value>",
        ] {
            assert!(decode_value(bad).is_err(), "{bad:?}");
        }
        for bad in [
            "<methodCall></methodCall>",
            "<methodCall><methodName></methodName></methodCall>",
            "<methodCall><methodName>x</methodName><params><param>1</param></params></methodCall>",
            "<methodCall><methodName>x</methodName>",
            "<methodResponse/>",
        ] {
            assert!(decode_call(bad).is_err(), "{bad:?}");
        }
        let big = " ".repeat(MAX_INPUT + 1);
        assert!(decode_value(&big).unwrap_err().contains("larger"));
    }
}
