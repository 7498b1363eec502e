//! [`short_reason`]: what an object service answered, folded to one short
//! line for error messages.

/// The longest reason an object-store error keeps.
const MAX_REASON: usize = 400;

/// What a service answered, in one short line: the error `Code` and the
/// first line of its `Message` instead of the XML body Azure and S3 send
/// (`object_store` puts the body in its error text), whitespace folded,
/// and at most [`MAX_REASON`] characters.
pub fn short_reason(text: &str) -> String {
    let tag = |name: &str| -> Option<String> {
        let open = format!("<{name}>");
        let from = text.find(&open)? + open.len();
        let len = text.get(from..)?.find(&format!("</{name}>"))?;
        let inner = text.get(from..from + len)?;
        Some(inner.lines().next().unwrap_or_default().trim().to_string())
    };
    let xml_at = ["<?xml", "<Error"]
        .iter()
        .filter_map(|m| text.find(m))
        .min();
    let line = match xml_at {
        Some(at) => {
            let before = text.get(..at).unwrap_or_default();
            let before = before
                .trim_end()
                .trim_end_matches("body:")
                .trim_end()
                .trim_end_matches([',', ':']);
            let said = match (tag("Code"), tag("Message")) {
                (Some(c), Some(m)) => format!("{c}: {m}"),
                (Some(c), None) => c,
                (None, Some(m)) => m,
                (None, None) => "an error without a code".to_string(),
            };
            format!("{before}: {said}")
        }
        None => text.to_string(),
    };
    let mut out = line.split_whitespace().collect::<Vec<_>>().join(" ");
    if out.chars().count() > MAX_REASON {
        out = out.chars().take(MAX_REASON).collect::<String>() + "…";
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_xml_answer_becomes_one_short_line() {
        let azure = "Generic MicrosoftAzure error: Error performing PUT http://127.0.0.1:1/devstoreaccount1/nope/v/copy in 2ms - Server returned non-success status code: 404 Not Found, body: <?xml version=\"1.0\" encoding=\"utf-8\"?>\n<Error>\n  <Code>ContainerNotFound</Code>\n  <Message>The specified container does not exist.\nRequestId:6f1c\nTime:2026-12-05T21:00:00Z</Message>\n</Error>";
        let short = short_reason(azure);
        assert!(!short.contains('<'), "{short}");
        assert!(!short.contains("RequestId"), "{short}");
        assert!(
            short.ends_with(
                "404 Not Found: ContainerNotFound: The specified container does not exist."
            ),
            "{short}"
        );
        assert!(!short.contains('\n'));
        // As Azurite answers a refused key (no `body:` before the XML).
        let forbidden = short_reason(
            "status code: 403 Forbidden: <?xml version=\"1.0\"?><Error><Code>AuthorizationFailure</Code><Message>Server failed to authenticate the request.</Message></Error>",
        );
        assert_eq!(
            forbidden,
            "status code: 403 Forbidden: AuthorizationFailure: Server failed to authenticate the request."
        );
        let long = "x ".repeat(1000);
        assert!(short_reason(&long).chars().count() <= MAX_REASON + 1);
        assert_eq!(short_reason("connection refused"), "connection refused");
    }
}
