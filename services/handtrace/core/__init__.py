"""What every service shares: settings, codec, topic names, ids, clock. Services import only this."""
