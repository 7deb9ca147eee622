"""HTTP pieces shared by the ingest edge and the core's API: auth, body limits, error shapes."""
