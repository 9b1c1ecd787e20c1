"""Listeners: accept downstream connections and turn what they read into `Call`s."""
