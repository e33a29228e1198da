"""Where rows come from: the Telegram export reader, ingest, extraction queries."""
