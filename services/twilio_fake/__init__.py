"""A local stand-in for Twilio's REST API, for tests and for `switchboard up` without credentials.

Every request is checked against Twilio's own OpenAPI description (path, method, auth, required
and known form fields, enums, patterns) and answered with a body of the documented shape.
"""
