//! A running job's `deployment.storage` files (`http` and `tftp`), as the DUT asks for
//! them by path.
//!
//! An entry's `path` is matched against the requested path (leading `/` ignored on both
//! sides): literally first, then as a regular expression that must match the whole path;
//! `\1`…`\9` in the entry's `url` are replaced by the groups of that match (CI-tron's
//! rule). The first matching entry wins.

use farmgate_job::StorageFile;

/// What a storage path resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageContent {
    /// Inline content (`data`).
    Data(Vec<u8>),
    /// Content to fetch from a URL (`url`, with the groups substituted).
    Url(String),
}

/// The content of `path` among `files`, or why there is none.
pub fn find(files: &[StorageFile], path: &str) -> Result<StorageContent, String> {
    let wanted = path.trim_start_matches('/');
    let content = |f: &StorageFile, url: Option<String>| -> Result<StorageContent, String> {
        if let Some(data) = &f.artifact.data {
            return Ok(StorageContent::Data(data.clone().into_bytes()));
        }
        match url {
            Some(u) => Ok(StorageContent::Url(u)),
            None => Err(format!(
                "storage file {:?} has neither data nor url (archives are not served yet)",
                f.path
            )),
        }
    };
    if let Some(f) = files
        .iter()
        .find(|f| f.path.trim_start_matches('/') == wanted)
    {
        return content(f, f.artifact.url.clone());
    }
    for f in files {
        let Ok(re) = regex::Regex::new(&format!("^(?:{})$", f.path.trim_start_matches('/'))) else {
            continue;
        };
        if let Some(caps) = re.captures(wanted) {
            let url = f.artifact.url.as_ref().map(|u| {
                let mut out = u.clone();
                for i in (1..caps.len().min(10)).rev() {
                    let group = caps.get(i).map_or("", |m| m.as_str());
                    out = out.replace(&format!("\\{i}"), group);
                }
                out
            });
            return content(f, url);
        }
    }
    Err(format!("the job serves no file {path:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<StorageFile> {
        let job = farmgate_job::parse(
            r#"version: 1
console_patterns:
  session_end:
    regex: end
deployment:
  start:
    kernel:
      url: http://gw/k
    storage:
      http:
        - path: /hello.txt
          data: "hello DUT"
        - path: 'firmware/(.*)/(.*)\.bin'
          url: 'http://fw.example/\2/\1.bin'
      tftp:
        - path: pxelinux.cfg/default
          data: "DEFAULT linux"
"#,
        )
        .expect("valid job");
        job.deployment.for_boot(0).storage.http
    }

    #[test]
    fn literal_regex_with_groups_and_missing() {
        let f = files();
        assert_eq!(
            find(&f, "hello.txt"),
            Ok(StorageContent::Data(b"hello DUT".to_vec()))
        );
        assert_eq!(
            find(&f, "/firmware/amd/gpu.bin"),
            Ok(StorageContent::Url("http://fw.example/gpu/amd.bin".into()))
        );
        let e = find(&f, "firmware/x.bin").expect_err("no match");
        assert!(e.contains("no file"), "{e}");
        assert!(find(&f, "../etc/passwd").is_err());
    }
}
