"""The voice channel: Twilio Voice webhooks; speech in, TwiML out. Late replies leave through egress."""
