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

/// An S3 error body (`<Error><Code>..</Code><Message>..</Message></Error>`).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct ErrorBody {
    #[serde(rename = "Code", default)]
    pub code: String,
    #[serde(rename = "Message", default)]
    pub message: String,
}

/// ListBuckets result, as an external store answers it.
#[derive(Debug, Deserialize)]
pub(crate) struct ListAllMyBuckets {
    #[serde(rename = "Buckets", default)]
    pub buckets: BucketList,
}

/// The `<Buckets>` of a ListBuckets result.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct BucketList {
    #[serde(rename = "Bucket", default)]
    pub bucket: Vec<BucketEntry>,
}

/// One bucket of a ListBuckets result.
#[derive(Debug, Deserialize)]
pub(crate) struct BucketEntry {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "CreationDate", default)]
    pub creation_date: String,
}

/// ListObjectsV2 result, as an external store answers it.
#[derive(Debug, Deserialize)]
pub(crate) struct ListBucketResult {
    #[serde(rename = "Contents", default)]
    pub contents: Vec<ListedObject>,
    #[serde(rename = "IsTruncated", default)]
    pub is_truncated: bool,
    #[serde(rename = "NextContinuationToken", default)]
    pub next_continuation_token: Option<String>,
}

/// One object of a listing.
#[derive(Debug, Deserialize)]
pub(crate) struct ListedObject {
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "Size", default)]
    pub size: u64,
}

/// ListMultipartUploads result, as an external store answers it.
#[derive(Debug, Deserialize)]
pub(crate) struct ListUploadsResult {
    #[serde(rename = "Upload", default)]
    pub uploads: Vec<ListedUpload>,
}

/// One multipart upload of a ListMultipartUploads result.
#[derive(Debug, Deserialize)]
pub(crate) struct ListedUpload {
    #[serde(rename = "Key")]
    pub key: String,
    #[serde(rename = "UploadId")]
    pub upload_id: String,
}

/// Removes the elements whose name starts with `prefix` (with their content) from an XML
/// text; used to drop per-part checksums from a CompleteMultipartUpload body.
pub(crate) fn strip_elements(text: &str, prefix: &str) -> String {
    let open = format!("<{prefix}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find(&open) {
        let after = &rest[start + 1..];
        let name_len = after
            .find(|c: char| c == '>' || c == '/' || c.is_whitespace())
            .unwrap_or(after.len());
        let name = &after[..name_len];
        let close = format!("</{name}>");
        out.push_str(&rest[..start]);
        if let Some(gt) = after.find('>')
            && after[..gt].ends_with('/')
        {
            rest = &after[gt + 1..];
        } else if let Some(end) = after.find(&close) {
            rest = &after[end + close.len()..];
        } else {
            // Not well formed: leave the rest as it is.
            out.push_str(&rest[start..]);
            return out;
        }
    }
    out.push_str(rest);
    out
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
    fn strips_checksums_and_parses_listings() {
        let body = "<C><Part><ETag>\"a\"</ETag><ChecksumCRC32>xx==</ChecksumCRC32><PartNumber>1</PartNumber><ChecksumSHA1/></Part></C>";
        assert_eq!(
            strip_elements(body, "Checksum"),
            "<C><Part><ETag>\"a\"</ETag><PartNumber>1</PartNumber></Part></C>"
        );
        let l: ListBucketResult = parse(
            br#"<ListBucketResult xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>b</Name><IsTruncated>true</IsTruncated><Contents><Key>k</Key><Size>5</Size></Contents><NextContinuationToken>t</NextContinuationToken></ListBucketResult>"#,
        )
        .expect("valid listing");
        assert!(l.is_truncated);
        assert_eq!(l.contents[0].key, "k");
        assert_eq!(l.contents[0].size, 5);
        assert_eq!(l.next_continuation_token.as_deref(), Some("t"));
        let b: ListAllMyBuckets = parse(
            br#"<ListAllMyBucketsResult><Owner><ID>x</ID></Owner><Buckets><Bucket><Name>a</Name><CreationDate>2024-01-01T00:00:00.000Z</CreationDate></Bucket><Bucket><Name>b</Name></Bucket></Buckets></ListAllMyBucketsResult>"#,
        )
        .expect("valid bucket list");
        assert_eq!(b.buckets.bucket.len(), 2);
        assert_eq!(b.buckets.bucket[1].name, "b");
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
