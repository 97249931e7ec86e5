//! Errors of rendering and parsing a job description.

/// Why a job description cannot be used.
///
/// Every error names where the problem is: the line (in the template for rendering
/// errors, in the rendered YAML for the others) and the field path when it is known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// The Jinja2 template could not be rendered.
    #[error("template{}: {message}", at_line(*line))]
    Render {
        /// Line of the template (1-based), when known.
        line: Option<usize>,
        /// What went wrong.
        message: String,
    },
    /// The rendered YAML is not a valid version 1 job description.
    #[error("job description{}: {message}", at_line(*line))]
    Invalid {
        /// Line of the rendered YAML (1-based), when known.
        line: Option<usize>,
        /// What went wrong, starting with the field path when known.
        message: String,
    },
}

fn at_line(line: Option<usize>) -> String {
    match line {
        Some(l) => format!(", line {l}"),
        None => String::new(),
    }
}

impl JobError {
    /// The line of the problem (1-based), when known.
    pub fn line(&self) -> Option<usize> {
        match self {
            JobError::Render { line, .. } | JobError::Invalid { line, .. } => *line,
        }
    }

    /// The message, without the line.
    pub fn message(&self) -> &str {
        match self {
            JobError::Render { message, .. } | JobError::Invalid { message, .. } => message,
        }
    }

    pub(crate) fn invalid(line: Option<usize>, message: impl Into<String>) -> JobError {
        JobError::Invalid {
            line,
            message: message.into(),
        }
    }

    /// Converts a YAML error, moving its location into `line` (serde_yaml_ng puts the
    /// field path at the start of its message and " at line L column C" at the end).
    pub(crate) fn from_yaml(err: &serde_yaml_ng::Error) -> JobError {
        let mut message = err.to_string();
        let line = err.location().map(|loc| {
            let suffix = format!(" at line {} column {}", loc.line(), loc.column());
            if let Some(stripped) = message.strip_suffix(&suffix) {
                message = stripped.to_string();
            }
            loc.line()
        });
        if message == "EOF while parsing a value" {
            message = "the job description is empty".into();
        }
        JobError::Invalid { line, message }
    }
}
