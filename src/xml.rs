//! A small, bounded XML tree: element names (namespaces dropped), their text and children.
//! Enough for the two XML dialects cbtfs reads from servers it does not trust: xapi's XML-RPC
//! (src/xapi/xmlrpc.rs) and S3's answers (src/repo/store/s3/sign.rs). Nesting is bounded by
//! the caller, so a hostile answer cannot exhaust the stack; attributes are ignored.

use quick_xml::events::Event;

/// An XML element.
#[derive(Debug, Default, Clone)]
pub struct Node {
    pub name: String,
    pub text: String,
    pub children: Vec<Node>,
}

impl Node {
    /// The first child named `name`.
    pub fn child(&self, name: &str) -> Option<&Node> {
        self.children.iter().find(|c| c.name == name)
    }
    /// The first child named `name`, or an error saying it is missing.
    pub fn require(&self, name: &str) -> Result<&Node, String> {
        self.child(name)
            .ok_or_else(|| format!("<{}> has no <{name}>", self.name))
    }
    /// The text of the first child named `name`.
    pub fn text_of(&self, name: &str) -> Option<&str> {
        self.child(name).map(|c| c.text.as_str())
    }
    /// Every child named `name`.
    pub fn all<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Node> + 'a {
        self.children.iter().filter(move |c| c.name == name)
    }
}

/// Parse a document into its root element, refusing nesting deeper than `max_depth`.
pub fn parse(xml: &str, max_depth: usize) -> Result<Node, String> {
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut stack: Vec<Node> = vec![Node::default()];
    let name_of = |e: &quick_xml::events::BytesStart<'_>| {
        String::from_utf8_lossy(e.local_name().as_ref()).into_owned()
    };
    loop {
        match reader
            .read_event()
            .map_err(|e| format!("malformed XML: {e}"))?
        {
            Event::Start(e) => {
                if stack.len() > max_depth {
                    return Err("XML nested too deeply".into());
                }
                stack.push(Node {
                    name: name_of(&e),
                    ..Node::default()
                });
            }
            Event::Empty(e) => {
                let n = Node {
                    name: name_of(&e),
                    ..Node::default()
                };
                if let Some(top) = stack.last_mut() {
                    top.children.push(n);
                }
            }
            Event::End(_) => {
                let n = stack.pop().ok_or("unbalanced XML")?;
                stack.last_mut().ok_or("unbalanced XML")?.children.push(n);
            }
            Event::Text(t) => {
                let s = t.decode().map_err(|e| format!("malformed XML text: {e}"))?;
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&s);
                }
            }
            // Entity and character references come as events of their own.
            Event::GeneralRef(r) => {
                let name = r.decode().map_err(|e| format!("malformed XML: {e}"))?;
                let s = quick_xml::escape::unescape(&format!("&{name};"))
                    .map_err(|e| format!("malformed XML entity: {e}"))?
                    .into_owned();
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&s);
                }
            }
            Event::CData(t) => {
                if let Some(top) = stack.last_mut() {
                    top.text.push_str(&String::from_utf8_lossy(&t));
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    if stack.len() != 1 {
        return Err("XML ends inside an element".into());
    }
    stack
        .pop()
        .and_then(|mut root| root.children.pop())
        .ok_or_else(|| "empty XML document".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_entities_cdata_and_bounds() {
        let t = parse(
            "<?xml version=\"1.0\"?><a:R xmlns:a=\"x\"><K>x &amp; y&#33;</K><E/><C><![CDATA[<z>]]></C></a:R>",
            4,
        )
        .unwrap();
        assert_eq!(t.name, "R");
        assert_eq!(t.text_of("K"), Some("x & y!"));
        assert!(t.child("E").is_some());
        assert_eq!(t.text_of("C"), Some("<z>"));
        assert_eq!(t.require("Q").unwrap_err(), "<R> has no <Q>");
        assert!(parse(&"<a>".repeat(6), 4).unwrap_err().contains("deeply"));
        assert!(parse("<a><b></a>", 4).is_err());
        assert!(parse("<a>", 4).is_err());
        assert!(parse("", 4).is_err());
        assert!(parse("<a>&bogus;</a>", 4).is_err());
    }
}
