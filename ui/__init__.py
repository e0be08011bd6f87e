"""The chat UI mounted at ``/ui``: FastChat's gradio web server, inside the gateway, generating on the
same runners (and through the same code) as ``/v1/chat/completions``. ``chat`` builds the page and its
direct chat tab, ``history`` keeps past chats in the browser, ``arena`` holds the side by side, arena
and leaderboard tabs."""

from ui.chat import build_chat_ui, chat_ui_app

__all__ = ["build_chat_ui", "chat_ui_app"]
