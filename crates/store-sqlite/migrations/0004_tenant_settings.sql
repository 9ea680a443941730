-- Each tenant's own OTP rules: a JSON object of overrides of the server's defaults.
ALTER TABLE tenants ADD COLUMN settings TEXT NOT NULL DEFAULT '{}';
