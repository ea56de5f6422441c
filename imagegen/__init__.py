"""imagegen: an image-generation job service on aiohttp and SQLite."""
