CREATE TABLE concert (concert_id integer, concert_name text, theme text /* e.g. 'Free choice', 'Bleeding Love', 'Happy Tonight' */, stadium_id integer, year text /* one of '2014', '2015' */, PRIMARY KEY (concert_id), FOREIGN KEY (stadium_id) REFERENCES stadium(stadium_id));
-- singer: Performers
CREATE TABLE singer (singer_id integer, name text, country text /* country of citizenship; e.g. 'Netherlands', 'United States', 'France' */, song_name text, song_release_year text, age integer, is_male boolean NOT NULL, PRIMARY KEY (singer_id));
CREATE TABLE singer_in_concert (concert_id integer, singer_id integer, PRIMARY KEY (concert_id, singer_id), FOREIGN KEY (concert_id) REFERENCES concert(concert_id), FOREIGN KEY (singer_id) REFERENCES singer(singer_id));
CREATE TABLE stadium (stadium_id integer, location text /* e.g. 'Raith Rovers', 'Ayr United', 'Queen''s Park' */, name text, capacity integer, highest integer, lowest integer, average integer, PRIMARY KEY (stadium_id));
CREATE VIEW reporting."Top Singers" (name text, "order" bigint);
