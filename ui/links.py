"""Only http, https and mailto links, and no ``data:`` image, in the chat page and its Markdown export.

On the page, Gradio's sanitizer (``gr.Chatbot``'s ``sanitize_html``, on) drops ``javascript:`` and
``data:`` from HTML ``<a>`` and forms, but keeps an SVG ``<a href="javascript:...">`` (a click runs it
in the page), any other scheme (``file:``, an app's protocol handler) and ``data:`` images; KaTeX, which
Gradio runs without its ``trust`` option, renders ``\\href`` and ``\\url`` as text. ``PAGE_SCRIPT``
(the page's ``js``) removes from the rendered Markdown of every message, as it is put on the page
(the history reopened too), each URL attribute that is not http, https or mailto.

In the Markdown export, a message that has, or might have, anything else (raw HTML, another link or
image, a reference definition, KaTeX's ``\\href``) is written as its source, in a code block.
"""

from __future__ import annotations

import re

PAGE_SCRIPT = """() => {
  const allowed = new Set(["http:", "https:", "mailto:"]);
  const urls = new Set(["href", "xlink:href", "src", "srcset", "poster", "action", "formaction", "background"]);
  const safe = (name, value) => {
    if (name === "srcset") return false;  // a list of URLs: never needed by Markdown
    try { return allowed.has(new URL(value, document.baseURI).protocol); } catch { return false; }
  };
  const clean = (element) => {
    if (!element.closest(".md")) return;  // rendered Markdown only: not Gradio's own controls
    for (const {name, value} of [...element.attributes])
      if (urls.has(name) && !safe(name, value)) element.removeAttribute(name);
  };
  const sweep = (node) => {
    if (node.nodeType !== Node.ELEMENT_NODE) return;
    clean(node);
    node.querySelectorAll("*").forEach(clean);
  };
  // Mutation records arrive before the browser handles any click: nothing removed here is ever clickable.
  new MutationObserver((records) => records.forEach((r) => r.type === "attributes" ? clean(r.target)
                                                                                   : r.addedNodes.forEach(sweep)))
    .observe(document.body, {subtree: true, childList: true, attributes: true, attributeFilter: [...urls]});
  sweep(document.body);
}"""

# What might make a link other than http(s) or mailto, or an image from elsewhere, in some Markdown viewer:
# a tag or an autolink, an inline or reference destination of another kind, KaTeX's \href and \url.
UNSAFE = re.compile(r"<[A-Za-z!?/]|\](?:\(|:)\s*+(?!<?(?:https?://|mailto:))|\\(?:href|url)\b", re.IGNORECASE)
PUNCTUATION = re.compile(r"([!-/:-@\[-`{-~])")


def markdown_block(text: str) -> str:
    """``text`` for a Markdown file: as it is, or where ``UNSAFE``, as its source in a code block."""
    if not UNSAFE.search(text):
        return text
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return f"{fence}text\n{text}\n{fence}"


def markdown_line(text: str) -> str:
    """One line of ``text`` for a Markdown file: as it is, or where ``UNSAFE``, its punctuation escaped."""
    return PUNCTUATION.sub(r"\\\1", text) if UNSAFE.search(text) else text
