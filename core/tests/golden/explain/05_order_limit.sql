SELECT song_name ,  song_release_year FROM singer ORDER BY age LIMIT 1
