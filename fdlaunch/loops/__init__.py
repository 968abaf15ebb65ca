"""The long-running parts: notify-wait's watcher, handoff, accept's server, foreground's keeper.

They never print: each is handed a say(kind, text) to speak with.
"""
