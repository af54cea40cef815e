"""Jinja templates and static assets of the atlas (shipped in the wheel as ``sitegen.templates``)."""
