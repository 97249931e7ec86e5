//! XML bodies of the S3 API: a small writer for responses, and serde types for the
//! request bodies that are parsed (DeleteObjects, CompleteMultipartUpload).

use serde::Deserialize;

pub(crate) const NS: &str = "http://s3.amazonaws.com/doc/2006-03-01/";

/// Escapes text for XML element content and attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Characters XML 1.0 cannot carry even escaped: written as a numeric reference
            // S3 also uses (clients asking for encoding-type=url avoid the issue).
            c if (c as u32) < 0x20 && !matches!(c, '\t' | '\n' | '\r') => {
                out.push_str(&format!("&#x{:X};", c as u32))
            }
            c => out.push(c),
        }
    }
    out
}

/// Builds an XML document element by element.
pub(crate) struct XmlWriter {
    out: String,
}

impl XmlWriter {
    /// A document whose root element is `root` (in the S3 namespace).
    pub(crate) fn new(root: &str) -> Self {
        XmlWriter {
            out: format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{root} xmlns=\"{NS}\">"),
        }
    }

    /// A document without the namespace attribute (errors).
    pub(crate) fn new_plain(root: &str) -> Self {
        XmlWriter {
            out: format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<{root}>"),
        }
    }

    pub(crate) fn open(&mut self, name: &str) -> &mut Self {
        self.out.push('<');
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    pub(crate) fn close(&mut self, name: &str) -> &mut Self {
        self.out.push_str("</");
        self.out.push_str(name);
        self.out.push('>');
        self
    }

    pub(crate) fn elem(&mut self, name: &str, text: &str) -> &mut Self {
        self.open(name);
        self.out.push_str(&escape(text));
        self.close(name)
    }

    /// Appends already-escaped XML.
    pub(crate) fn raw(&mut self, xml: &str) -> &mut Self {
        self.out.push_str(xml);
        self
    }

    /// Appends escaped text.
    pub(crate) fn elem_text(&mut self, text: &str) -> &mut Self {
        self.out.push_str(&escape(text));
        self
    }

    pub(crate) fn finish(mut self, root: &str) -> String {
        self.close(root);
        self.out
    }
}

/// Body of DeleteObjects (`POST /<bucket>?delete`).
#[derive(Debug, Deserialize)]
pub(crate) struct DeleteRequest {
    #[serde(rename = "Object", default)]
    pub objects: Vec<DeleteObject>,
    #[serde(rename = "Quiet", default)]
    pub quiet: bool,
}

/// One object of a DeleteObjects body.
#[derive(Debug, Deserialize)]
pub(crate) struct DeleteObject {
    #[serde(rename = "Key")]
    pub key: String,
}

/// Body of CompleteMultipartUpload.
#[derive(Debug, Deserialize)]
pub(crate) struct CompleteRequest {
    #[serde(rename = "Part", default)]
    pub parts: Vec<CompletePart>,
}

/// One part of a CompleteMultipartUpload body.
#[derive(Debug, Deserialize)]
pub(crate) struct CompletePart {
    #[serde(rename = "PartNumber")]
    pub part_number: u32,
    #[serde(rename = "ETag")]
    pub etag: String,
}

/// Parses an XML request body into `T`; the error says what is wrong.
pub(crate) fn parse<T: for<'de> Deserialize<'de>>(body: &[u8]) -> Result<T, String> {
    let text = std::str::from_utf8(body).map_err(|_| "the XML body is not UTF-8".to_string())?;
    quick_xml::de::from_str(text).map_err(|e| format!("malformed XML body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_delete_and_complete() {
        let d: DeleteRequest = parse(
            br#"<?xml version="1.0" encoding="UTF-8"?>
<Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Object><Key>a&amp;b</Key></Object><Object><Key>c</Key><VersionId>x</VersionId></Object><Quiet>true</Quiet></Delete>"#,
        )
        .expect("valid body");
        assert_eq!(d.objects.len(), 2);
        assert_eq!(d.objects[0].key, "a&b");
        assert!(d.quiet);
        let c: CompleteRequest = parse(
            br#"<CompleteMultipartUpload xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Part><ETag>"aa"</ETag><PartNumber>1</PartNumber><ChecksumCRC32>x</ChecksumCRC32></Part><Part><PartNumber>2</PartNumber><ETag>bb</ETag></Part></CompleteMultipartUpload>"#,
        )
        .expect("valid body");
        assert_eq!(c.parts.len(), 2);
        assert_eq!(c.parts[1].part_number, 2);
        assert_eq!(c.parts[0].etag, "\"aa\"");
        assert!(parse::<CompleteRequest>(b"<CompleteMultipartUpload><Part>").is_err());
    }

    #[test]
    fn writer_escapes() {
        let mut w = XmlWriter::new("R");
        w.elem("Key", "a<b&\"c\"\u{1}");
        let s = w.finish("R");
        assert!(
            s.ends_with("<Key>a&lt;b&amp;&quot;c&quot;&#x1;</Key></R>"),
            "{s}"
        );
    }
}
