-- The schema of casemask's previous release (commit a9551c1, node/db.py), as its
-- create_all made it in SQLite: tests/test_schema.py builds a database from it and upgrades it.
CREATE TABLE studies (
	id INTEGER NOT NULL, 
	study_uid VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	first_received_at DATETIME NOT NULL, 
	last_received_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (study_uid)
);
CREATE INDEX ix_studies_last_received_at ON studies (last_received_at);
CREATE TABLE pseudonyms (
	id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	old VARCHAR(128) NOT NULL, 
	new VARCHAR(128) NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (kind, old)
);
CREATE TABLE instances (
	id INTEGER NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	study_id INTEGER NOT NULL, 
	series_uid VARCHAR(64) NOT NULL, 
	modality VARCHAR(16) NOT NULL, 
	transfer_syntax VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	size INTEGER NOT NULL, 
	calling_ae VARCHAR(16) NOT NULL, 
	called_ae VARCHAR(16) NOT NULL, 
	peer_host VARCHAR(64) NOT NULL, 
	received_at DATETIME NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	reason TEXT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (sop_instance_uid), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
CREATE INDEX ix_instances_state ON instances (state);
CREATE INDEX ix_instances_study_id ON instances (study_id);
CREATE TABLE jobs (
	id INTEGER NOT NULL, 
	instance_id INTEGER NOT NULL, 
	study_id INTEGER NOT NULL, 
	route VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	lease_until DATETIME, 
	attempts INTEGER NOT NULL, 
	reason TEXT NOT NULL, 
	updated_at DATETIME NOT NULL, 
	record TEXT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (instance_id, route), 
	FOREIGN KEY(instance_id) REFERENCES instances (id), 
	FOREIGN KEY(study_id) REFERENCES studies (id)
);
CREATE INDEX ix_jobs_state_lease ON jobs (state, lease_until);
CREATE INDEX ix_jobs_study_id ON jobs (study_id);
CREATE TABLE outputs (
	id INTEGER NOT NULL, 
	job_id INTEGER NOT NULL, 
	kind VARCHAR(32) NOT NULL, 
	sop_instance_uid VARCHAR(64) NOT NULL, 
	sop_class_uid VARCHAR(64) NOT NULL, 
	transfer_syntax VARCHAR(64) NOT NULL, 
	path TEXT NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (job_id, kind), 
	FOREIGN KEY(job_id) REFERENCES jobs (id)
);
CREATE INDEX ix_outputs_job_id ON outputs (job_id);
CREATE TABLE deliveries (
	id INTEGER NOT NULL, 
	output_id INTEGER NOT NULL, 
	destination VARCHAR(64) NOT NULL, 
	state VARCHAR(16) NOT NULL, 
	attempts INTEGER NOT NULL, 
	next_attempt_at DATETIME NOT NULL, 
	lease_until DATETIME, 
	reason TEXT NOT NULL, 
	sent_at DATETIME, 
	PRIMARY KEY (id), 
	UNIQUE (output_id, destination), 
	FOREIGN KEY(output_id) REFERENCES outputs (id)
);
CREATE INDEX ix_deliveries_due ON deliveries (state, next_attempt_at);
CREATE INDEX ix_deliveries_destination ON deliveries (destination);
