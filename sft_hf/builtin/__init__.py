"""Built-in assets that need no download: the default recipe's toy tasks and tiny Llama (toy.py), and a multi-turn
chat set built from chapter 7's records (chapter7_chat.py)."""
