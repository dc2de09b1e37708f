"""The email channel: SMTP in (aiosmtpd), never an open relay. Replies leave through egress."""
