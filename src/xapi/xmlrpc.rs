//! XML-RPC as xapi speaks it, mapped onto `serde_json::Value` so both transports share one value
//! model. xapi's quirks: a value without a type element is a string, 64-bit integers travel as
//! strings, and results are never faults but a `Status`/`Value`/`ErrorDescription` struct.

use quick_xml::escape::escape;
use serde_json::{Map, Value};

use crate::xml::Node;

/// Deepest nesting accepted: a hostile reply must not exhaust the stack.
const MAX_DEPTH: usize = 64;

fn parse(xml: &str) -> Result<Node, String> {
    crate::xml::parse(xml, MAX_DEPTH)
}

fn value(node: &Node) -> Result<Value, String> {
    let Some(typed) = node.children.first() else {
        return Ok(Value::String(node.text.clone())); // untyped: a string
    };
    Ok(match typed.name.as_str() {
        "string" => Value::String(typed.text.clone()),
        "int" | "i4" | "i8" => Value::from(
            typed
                .text
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("bad integer {:?}", typed.text))?,
        ),
        "boolean" => Value::Bool(match typed.text.trim() {
            "1" => true,
            "0" => false,
            t => return Err(format!("bad boolean {t:?}")),
        }),
        "double" => serde_json::Number::from_f64(
            typed
                .text
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("bad double {:?}", typed.text))?,
        )
        .map(Value::Number)
        .unwrap_or(Value::Null),
        "dateTime.iso8601" | "base64" => Value::String(typed.text.trim().to_string()),
        "nil" => Value::Null,
        "array" => {
            let data = typed.require("data")?;
            Value::Array(
                data.children
                    .iter()
                    .filter(|c| c.name == "value")
                    .map(value)
                    .collect::<Result<_, _>>()?,
            )
        }
        "struct" => {
            let mut m = Map::new();
            for member in typed.children.iter().filter(|c| c.name == "member") {
                let name = member.require("name")?.text.clone();
                m.insert(name, value(member.require("value")?)?);
            }
            Value::Object(m)
        }
        other => return Err(format!("unknown XML-RPC type <{other}>")),
    })
}

fn encode_value(v: &Value, out: &mut String) {
    out.push_str("<value>");
    match v {
        // xapi sends strings untyped; typed <string> is accepted on input as well.
        Value::String(s) => out.push_str(&escape(s.as_str())),
        Value::Bool(b) => out.push_str(if *b {
            "<boolean>1</boolean>"
        } else {
            "<boolean>0</boolean>"
        }),
        // 64-bit integers travel as strings (XML-RPC's int is 32-bit).
        Value::Number(n) if n.is_i64() || n.is_u64() => out.push_str(&n.to_string()),
        Value::Number(n) => {
            out.push_str("<double>");
            out.push_str(&n.to_string());
            out.push_str("</double>");
        }
        Value::Null => out.push_str("<nil/>"),
        Value::Array(a) => {
            out.push_str("<array><data>");
            for x in a {
                encode_value(x, out);
            }
            out.push_str("</data></array>");
        }
        Value::Object(m) => {
            out.push_str("<struct>");
            for (k, x) in m {
                out.push_str("<member><name>");
                out.push_str(&escape(k.as_str()));
                out.push_str("</name>");
                encode_value(x, out);
                out.push_str("</member>");
            }
            out.push_str("</struct>");
        }
    }
    out.push_str("</value>");
}

/// `<methodCall>` for `method(params)`.
pub fn encode_call(method: &str, params: &[Value]) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodCall><methodName>");
    out.push_str(&escape(method));
    out.push_str("</methodName><params>");
    for p in params {
        out.push_str("<param>");
        encode_value(p, &mut out);
        out.push_str("</param>");
    }
    out.push_str("</params></methodCall>");
    out
}

/// The method and parameters of a `<methodCall>` (the simulated host's side).
pub fn decode_call(xml: &str) -> Result<(String, Vec<Value>), String> {
    let root = parse(xml)?;
    if root.name != "methodCall" {
        return Err(format!("expected <methodCall>, got <{}>", root.name));
    }
    let method = root.require("methodName")?.text.trim().to_string();
    let params = match root.child("params") {
        Some(p) => p
            .children
            .iter()
            .filter(|c| c.name == "param")
            .map(|c| c.require("value").and_then(value))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok((method, params))
}

/// A bare `<value>` (what a task's `result` field holds).
pub fn decode_value(xml: &str) -> Result<Value, String> {
    let root = parse(xml)?;
    if root.name != "value" {
        return Err(format!("expected <value>, got <{}>", root.name));
    }
    value(&root)
}

/// A bare `<value>` for `v`.
pub fn encode_value_fragment(v: &Value) -> String {
    let mut out = String::new();
    encode_value(v, &mut out);
    out
}

/// `<methodResponse>` holding one value.
pub fn encode_response(v: &Value) -> String {
    let mut out = String::from("<?xml version=\"1.0\"?><methodResponse><params><param>");
    encode_value(v, &mut out);
    out.push_str("</param></params></methodResponse>");
    out
}

/// The value of a `<methodResponse>`; a `<fault>` (which xapi does not send, but a proxy
/// might) becomes an error.
pub fn decode_response(xml: &str) -> Result<Value, String> {
    let root = parse(xml)?;
    if root.name != "methodResponse" {
        return Err(format!("expected <methodResponse>, got <{}>", root.name));
    }
    if let Some(f) = root.child("fault") {
        return Err(format!("XML-RPC fault: {}", value(f.require("value")?)?));
    }
    let param = root.require("params")?.require("param")?;
    value(param.require("value")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn round_trip_and_untyped_strings() {
        let v = json!({"Status": "Success", "Value": {"a": ["x<&>", true, 5, 1.5, null], "b": {}}});
        let xml = encode_response(&v);
        assert!(xml.contains("<value>Success</value>"), "{xml}");
        // Integers come back as strings, as xapi sends its 64-bit ints.
        let back =
            json!({"Status": "Success", "Value": {"a": ["x<&>", true, "5", 1.5, null], "b": {}}});
        assert_eq!(decode_response(&xml).unwrap(), back);
        let call = encode_call("VDI.get_record", &[json!("OpaqueRef:1"), json!("x")]);
        let (m, p) = decode_call(&call).unwrap();
        assert_eq!(m, "VDI.get_record");
        assert_eq!(p, vec![json!("OpaqueRef:1"), json!("x")]);
    }

    #[test]
    fn typed_values_as_xapi_and_others_send_them() {
        let xml = "<?xml version='1.0'?><methodResponse><params><param><value><struct>\
            <member><name>Status</name><value><string>Success</string></value></member>\
            <member><name>Value</name><value><array><data><value><i4>7</i4></value>\
            <value><boolean>0</boolean></value><value><dateTime.iso8601>20261123T10:00:00Z</dateTime.iso8601></value>\
            <value>4294967296</value></data></array></value></member></struct></value></param></params></methodResponse>";
        assert_eq!(
            decode_response(xml).unwrap(),
            json!({"Status": "Success", "Value": [7, false, "20261123T10:00:00Z", "4294967296"]})
        );
    }

    #[test]
    fn hostile_input_is_an_error() {
        assert!(decode_response("<methodResponse><params>").is_err());
        assert!(decode_response("not xml at all").is_err());
        let deep = "<value><array><data>".repeat(200);
        assert!(decode_response(&format!("<methodResponse><params><param>{deep}")).is_err());
        assert!(
            decode_response("<methodResponse><fault><value>x</value></fault></methodResponse>")
                .is_err()
        );
    }
}
