"""The SMS channel: Twilio Messaging webhooks in. Replies leave through egress."""
