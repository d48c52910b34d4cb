CREATE TABLE public.concert (concert_id integer, concert_name text, theme text, stadium_id integer, year text, PRIMARY KEY (concert_id), FOREIGN KEY (stadium_id) REFERENCES public.stadium(stadium_id));
CREATE TABLE public.singer (singer_id integer, name text, country text, song_name text, song_release_year text, age integer, is_male boolean NOT NULL, PRIMARY KEY (singer_id));
CREATE TABLE public.singer_in_concert (concert_id integer, singer_id integer, PRIMARY KEY (concert_id, singer_id), FOREIGN KEY (concert_id) REFERENCES public.concert(concert_id), FOREIGN KEY (singer_id) REFERENCES public.singer(singer_id));
CREATE TABLE public.stadium (stadium_id integer, location text, name text, capacity integer, highest integer, lowest integer, average integer, PRIMARY KEY (stadium_id));
CREATE VIEW reporting."Top Singers" (name text, "order" bigint);
